"""What the lock engine's state is made of -- domains, resources with their three queues,
locks -- and the request flags and the events that describe changes to it. Plain data:
`minidisk.dlm.engine` holds every rule that changes it.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from minidisk.dlm.modes import Mode

LVB_LEN = 64  # o2dlm/dlmfs size; also the VMS extended value block

# Owners are opaque hashable values chosen by the engine's caller; `str(owner)` shows one.
Owner = Hashable


class Flag(enum.IntFlag):
    """Request flags (Linux DLM_LKF_* names, only the ones this engine implements)."""

    NONE = 0
    NOQUEUE = 1        # fail with EAGAIN instead of queueing (trylock)
    QUECVT = 2         # a conversion goes behind queued conversions even if compatible
    CONVDEADLK = 4     # on conversion deadlock, demote this lock to NL instead of EDEADLK
    PERSISTENT = 8     # survives its owner as an orphan (new requests only)
    IVVALBLK = 16      # on PW/EX down-conversion or unlock, mark the value block invalid
    ORPHAN = 32        # adopt an orphan of the same resource and mode (new requests only)
    NOQUEUEBAST = 64   # a failed NOQUEUE request still notifies the holders in its way


@dataclass(frozen=True, slots=True)
class Granted:
    """A request or conversion was granted. `lvb` is the resource's value block when this grant
    reads it (new grants, up-conversions), else None; `lvb_valid`/`lvb_seq` always describe it.
    `demoted` is set when CONVDEADLK demoted the lock to NL on the way."""

    lkid: int
    owner: Owner
    mode: Mode
    token: int
    lvb: bytes | None
    lvb_seq: int
    lvb_valid: bool
    demoted: bool


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A pending request or conversion was taken back. `mode` is the mode still held (the old
    granted mode of a conversion), or None when the lock no longer exists."""

    lkid: int
    owner: Owner
    mode: Mode | None


@dataclass(frozen=True, slots=True)
class Blocking:
    """A granted lock is in the way of a queued request for `mode` (sent once per mode)."""

    lkid: int
    owner: Owner
    mode: Mode


Event = Granted | Cancelled | Blocking


@dataclass(eq=False, slots=True)
class LockState:
    """One lock. `owner` is None for an orphan (then `orphan_of` is its dead owner)."""

    lkid: int
    owner: Owner | None
    resource: Resource
    grmode: Mode | None
    rqmode: Mode | None
    persistent: bool
    rqflags: Flag = Flag.NONE
    token: int = 0
    bast_mode: Mode | None = None   # highest mode notified since the last grant
    pending_lvb: bytes | None = None  # the holder's copy, stored if its conversion writes
    demoted: bool = False
    orphan_of: Owner | None = None


@dataclass(eq=False, slots=True)
class Resource:
    """A resource and its three queues. Two summaries keep a request's cost independent of
    how many compatible locks the resource has:

    * `held`, the number of holders (granted and converting locks) in each granted mode, and
      `held_modes`, the modes whose count is not 0 (as bits), answer "does anyone else block
      this mode?" at once, without looking at the holders;
    * `notified`, when not None, says that every granted lock but the `fresh` one has had the
      basts that the blocked requests' modes (a subset of `notified`) call for -- so a request
      queued behind others in a mode already among them sends none, and a grant while others
      wait looks at that one lock, not at all the holders. None: look at them all.
    """

    domain: Domain
    name: str
    granted: dict[int, LockState] = field(default_factory=dict)
    converting: dict[int, LockState] = field(default_factory=dict)
    waiting: dict[int, LockState] = field(default_factory=dict)
    lvb: bytes = bytes(LVB_LEN)
    lvb_seq: int = 0
    lvb_valid: bool = True
    held: list[int] = field(default_factory=lambda: [0] * len(Mode))
    held_modes: int = 0
    notified: AbstractSet[Mode] | None = None
    fresh: LockState | None = None  # granted since the last look at the holders

    def holders(self) -> Iterable[LockState]:
        """Locks that hold a granted mode: the granted and the converting ones."""
        yield from self.granted.values()
        yield from self.converting.values()

    def has_locks(self) -> bool:
        return bool(self.granted or self.converting or self.waiting)


@dataclass(eq=False, slots=True)
class Domain:
    name: str
    members: set[Owner] = field(default_factory=set)
    resources: dict[str, Resource] = field(default_factory=dict)
    lock_count: int = 0
