"""z/VM LINK modes, their password classes, and how each maps onto lock-manager modes.

A link is admitted the way CP admits one: look at the other users' links, then hold a weaker
claim. On the lock manager that is (research/vmlink-etfs-buse.md §2.3) a NOQUEUE request in
the *test* mode, which fails at once exactly when z/VM's LINK would, followed by a
down-conversion to the *held* mode, which is always granted and decides what later linkers
see. WR and MR, when their test fails, try a read fallback (CR, held as CR) and report the
link degraded to read-only ("FORCED R/O").

    z/VM   RR  R   SR  MW  M   MR  W   WR  SM  SW  ER  EW
    test   CR  PR  PR  CW  PW  PW  EX  EX  PW  EX  EX  EX
    held   CR  CR  PR  CW  CW  CW  CW  CW  PW  PW  EX  EX

The mapping was checked against every rule of §2.1 for all holder sets of up to two other
users (0 mismatches); tests/link re-checks it against an independent model of the table.
SW's admission rule ("fails if any link") is IBM's unverified wording, taken as given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from minidisk.dlm.modes import Mode


class PasswordClass(enum.Enum):
    """MDISK's three passwords: which one a link mode needs (the owner never needs one)."""

    READ = "read"
    WRITE = "write"
    MULTI = "multi"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {PasswordClass.READ: 1, PasswordClass.WRITE: 2, PasswordClass.MULTI: 3}


@dataclass(frozen=True)
class LinkMode:
    name: str
    test: Mode
    held: Mode
    writes: bool  # a granted (not degraded) link may write
    password: PasswordClass
    fallback: bool = False  # WR, MR: degrade to a read link instead of failing


_TABLE = (
    LinkMode("R", Mode.PR, Mode.CR, False, PasswordClass.READ),
    LinkMode("RR", Mode.CR, Mode.CR, False, PasswordClass.READ),
    LinkMode("SR", Mode.PR, Mode.PR, False, PasswordClass.READ),
    LinkMode("ER", Mode.EX, Mode.EX, False, PasswordClass.READ),
    LinkMode("W", Mode.EX, Mode.CW, True, PasswordClass.WRITE),
    LinkMode("WR", Mode.EX, Mode.CW, True, PasswordClass.WRITE, fallback=True),
    LinkMode("SW", Mode.EX, Mode.PW, True, PasswordClass.WRITE),
    LinkMode("EW", Mode.EX, Mode.EX, True, PasswordClass.WRITE),
    LinkMode("M", Mode.PW, Mode.CW, True, PasswordClass.MULTI),
    LinkMode("MR", Mode.PW, Mode.CW, True, PasswordClass.MULTI, fallback=True),
    LinkMode("MW", Mode.CW, Mode.CW, True, PasswordClass.MULTI),
    LinkMode("SM", Mode.PW, Mode.PW, True, PasswordClass.MULTI),
)
LINK_MODES: dict[str, LinkMode] = {m.name: m for m in _TABLE}

# The read fallback of WR and MR: admitted unless someone holds an exclusive link.
FALLBACK_TEST = Mode.CR
FALLBACK_HELD = Mode.CR

# The mode a link takes when nobody asked for one (z/VM's default for another user's disk).
DEFAULT_MODE = "R"


def parse_link_mode(text: str) -> LinkMode:
    try:
        return LINK_MODES[text.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown link mode {text!r} "
                         f"(one of {' '.join(LINK_MODES)})") from None


def allowed_by(granted: LinkMode, wanted: LinkMode) -> bool:
    """A grant names the strongest mode; it covers every mode of its password class or a
    lower one (READ < WRITE < MULTI), as RACF's READ/UPDATE/CONTROL levels do."""
    return wanted.password.rank <= granted.password.rank
