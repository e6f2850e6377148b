"""The messages of the lock manager's wire format, as frozen dataclasses (h11's events): what
`protocol.decode_request` makes of a client's frame and `protocol.decode_reply` of the
service's. No I/O and no bytes here; `minidisk.dlm.protocol` has the layouts.

JSON requests' `call_id` is whatever the client sent as "id": the reply echoes it as it came.

Speed: a frozen dataclass's own `__init__` sets each field through `object.__setattr__`
(~0.15-0.3 us a field on Python 3.11, three to six times a plain assignment), and every frame
of a lock cycle is decoded into one -- two on each side per lock+unlock, whose whole cost is
~17 us of CPU. So the decoders make them with `build`, which sets the instance's `__dict__` in
one call (hence no `slots`); equality, hashing, `repr` and immutability are the dataclass's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from minidisk.dlm.listing import Cursor
from minidisk.dlm.modes import Mode
from minidisk.dlm.state import Flag

_M = TypeVar("_M")
_new = object.__new__
_set = object.__setattr__


def build(cls: type[_M], fields: dict[str, Any]) -> _M:
    """`cls(**fields)` without the dataclass's `__init__` (see the module's docstring):
    `fields` must name every field of `cls`, and nothing else."""
    message = _new(cls)
    _set(message, "__dict__", fields)
    return message


# -- requests (client to service) ------------------------------------------------------------

@dataclass(frozen=True)
class LockRequest:
    """LOCK: a new lock, `ref`, on resource `name` of `domain`."""

    call_id: int
    ref: int
    mode: Mode
    flags: Flag
    domain: str
    name: str


@dataclass(frozen=True)
class ConvertRequest:
    """CONVERT: change lock `ref` to `mode`; `lvb` is the holder's changed value block."""

    call_id: int
    ref: int
    mode: Mode
    flags: Flag
    lvb: bytes | None


@dataclass(frozen=True)
class UnlockRequest:
    """UNLOCK, or UNLOCK_QUIET (`quiet`: answered only if it fails)."""

    call_id: int
    ref: int
    flags: Flag
    lvb: bytes | None
    quiet: bool


@dataclass(frozen=True)
class CancelRequest:
    """CANCEL: take back lock `ref`'s pending request or conversion."""

    call_id: int
    ref: int


@dataclass(frozen=True)
class Hello:
    """JSON hello. `features` None: the field was absent (a sync), nothing changes."""

    call_id: Any
    name: str
    features: tuple[str, ...] | None


@dataclass(frozen=True)
class Join:
    call_id: Any
    domain: str


@dataclass(frozen=True)
class Leave:
    call_id: Any
    domain: str


@dataclass(frozen=True)
class Drop:
    call_id: Any
    domain: str
    name: str


@dataclass(frozen=True)
class StatusRequest:
    """JSON status: the page after cursor `after` (None: the first page)."""

    call_id: Any
    after: Cursor | None


@dataclass(frozen=True)
class Purge:
    """JSON purge: orphans of `domain` (None: all) left by `pid` (None: anyone)."""

    call_id: Any
    domain: str | None
    pid: int | None


JsonRequest = Hello | Join | Leave | Drop | StatusRequest | Purge
Request = LockRequest | ConvertRequest | UnlockRequest | CancelRequest | JsonRequest


# -- replies and events (service to client) --------------------------------------------------

@dataclass(frozen=True)
class OkReply:
    """OK: request `call_id` succeeded; `lkid` is the new lock's id (0 unless a LOCK)."""

    call_id: int
    lkid: int


@dataclass(frozen=True)
class ErrorReply:
    """ERROR, or a JSON reply with "ok": false. Call id 0 (no request has it): the service
    refuses the connection and hangs up."""

    call_id: int
    errno: int
    detail: str


@dataclass(frozen=True)
class JsonReply:
    """A JSON reply with "ok": true; `fields` is the whole reply object."""

    call_id: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class GrantEvent:
    """GRANT: lock `ref` holds `mode` now. `lvb` is the resource's value block when this grant
    reads it, else None; `lvb_valid` and `lvb_seq` always describe it."""

    ref: int
    mode: Mode
    token: int
    lvb_seq: int
    lvb_valid: bool
    demoted: bool
    lvb: bytes | None


@dataclass(frozen=True)
class GrantedReply(GrantEvent):
    """GRANTED: the reply to LOCK `call_id` granted at once (OK and GRANT in one)."""

    call_id: int
    lkid: int


@dataclass(frozen=True)
class CancelEvent:
    """CANCELLED: lock `ref`'s pending request was taken back; `mode` is what it still holds
    (None: the lock is gone)."""

    ref: int
    mode: Mode | None


@dataclass(frozen=True)
class BastEvent:
    """BAST: someone queued wants `mode`, which lock `ref` is in the way of."""

    ref: int
    mode: Mode


Reply = OkReply | ErrorReply | JsonReply | GrantedReply | GrantEvent | CancelEvent | BastEvent
