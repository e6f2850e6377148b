"""z/VM link modes: the §2.1 table, written here independently of minidisk.link.modes, is the
oracle; the §2.3 lock mapping must give its answer for every holder set of up to two other
users (pure), and the real server and lock manager for every pair of two linkers."""

from __future__ import annotations

import itertools

import pytest
from tests.link.link_helpers import MATRIX_DISKS, NOBODY, Site, second_link_outcome

from minidisk.control_client import ControlError
from minidisk.dlm.modes import compatible
from minidisk.link.modes import FALLBACK_HELD, FALLBACK_TEST, LINK_MODES

MODES = ["R", "RR", "SR", "ER", "W", "WR", "SW", "EW", "M", "MR", "MW", "SM"]
WRITES = {"W", "WR", "SW", "EW", "M", "MR", "MW", "SM"}
STABLE = {"SR", "SW", "SM"}
EXCLUSIVE = {"ER", "EW"}


def zvm(requested: str, existing: list[tuple[str, bool]]) -> str:
    """z/VM's LINK answer, from research §2.1: "write", "read", or "refused".

    `existing` holds the other users' links as (mode, got write access)."""
    modes = {m for m, _ in existing}
    writes = {m for m, w in existing if w}
    exclusive = bool(modes & EXCLUSIVE)
    stable = bool(modes & STABLE)
    if requested == "R":
        ok = not writes and not exclusive
    elif requested == "RR":
        ok = not exclusive
    elif requested in ("W", "SW", "ER", "EW"):
        ok = not existing
    elif requested == "WR":
        if exclusive:
            return "refused"
        return "read" if existing else "write"
    elif requested == "M":
        ok = not writes and not stable and not exclusive
    elif requested == "MR":
        if exclusive:
            return "refused"
        return "read" if writes or stable else "write"
    elif requested == "MW":
        ok = not stable and not exclusive
    elif requested == "SR":
        ok = not writes and not exclusive
    elif requested == "SM":
        ok = not writes and not stable and not exclusive
    else:
        raise AssertionError(requested)
    if not ok:
        return "refused"
    return "write" if requested in WRITES else "read"


def mapped(requested: str, held: list[str]) -> tuple[str, str | None]:
    """The §2.3 mapping on DLM compatibility: (answer, lock mode held afterwards)."""
    mode = LINK_MODES[requested]
    held_modes = [m for m in held]
    from minidisk.dlm.modes import Mode

    locks = [Mode[m] for m in held_modes]
    if all(compatible(mode.test, other) for other in locks):
        return ("write" if mode.writes else "read"), mode.held.name
    if mode.fallback and all(compatible(FALLBACK_TEST, other) for other in locks):
        return "read", FALLBACK_HELD.name
    return "refused", None


def test_mapping_matches_zvm_for_up_to_two_other_links() -> None:
    checked = 0
    for n in range(3):
        for existing_modes in itertools.product(MODES, repeat=n):
            # Build the holder set the way it would arise: each admitted in turn.
            existing: list[tuple[str, bool]] = []
            held: list[str] = []
            for m in existing_modes:
                answer, lock = mapped(m, held)
                if answer == "refused":
                    break
                existing.append((m, answer == "write"))
                assert lock is not None
                held.append(lock)
            else:
                for requested in MODES:
                    assert mapped(requested, held)[0] == zvm(requested, existing), \
                        (requested, existing)
                    checked += 1
    assert checked > 500


PAIRS = list(itertools.product(MODES, MODES))


@pytest.mark.timeout(120)
def test_every_pair_of_linkers_through_the_server(site: Site) -> None:
    """First linker uid 0 links in A, then uid 65534 asks for B, on a fresh disk each."""
    wrong = []
    for (first, second), disk in zip(PAIRS, MATRIX_DISKS, strict=True):
        name = f"alice.{disk}"
        a = site.holder(0)
        assert a.link(name, first)["access"] == ("read-write" if first in WRITES
                                                 else "read-only")
        b = site.holder(NOBODY)
        expected = zvm(second, [(first, first in WRITES)])
        got = second_link_outcome(b, name, first, second, "uid:0")
        if got != expected:
            wrong.append((first, second, got, expected))
        a.close()
        b.close()
    assert not wrong


def test_own_second_link_is_refused(site: Site) -> None:
    a = site.holder(0)
    a.link(f"alice.{MATRIX_DISKS[0]}", "R")
    with pytest.raises(ControlError, match="already linked by uid:0"):
        site.holder(0).link(f"alice.{MATRIX_DISKS[0]}", "RR")
