"""The Lock recipe: one lock on one resource, on a `DlmClient` connection (kazoo's
`recipe/lock.py` beside its client): `acquire(blocking, timeout)`, `convert()`, `release()`,
`cancel()` a pending request from another task, `contenders()`, the value block and the
fencing token.

Giving up on a wait (timeout, `cancel()`, or the caller's own cancel scope) sends a CANCEL, so
no abandoned request stays queued in front of other waiters. `release()` does not wait for its
answer unless `wait=True` (see `minidisk.dlm.client` for how the unlock then travels).

The connection routes a lock's events to it (`_granted`, `_cancelled`, `_bast`, `_lost`);
blocking notifications (`on_blocking`) run synchronously in the connection's reader: they
must not block; set an event or start a task instead.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from minidisk.dlm import protocol
from minidisk.dlm.engine import DlmError
from minidisk.dlm.loops import Waiter
from minidisk.dlm.messages import GrantEvent
from minidisk.dlm.modes import LvbAction, Mode, lvb_action
from minidisk.dlm.state import LVB_LEN, Flag

if TYPE_CHECKING:
    from minidisk.dlm.client import DlmClient

log = logging.getLogger("minidisk.dlm.client")

BlockingCallback = Callable[["Lock", Mode], None]


class Outcome(enum.Enum):
    """How a lock or convert request ended."""

    GRANTED = "granted"
    CANCELLED = "cancelled"  # taken back: timeout, cancel(), a cancelled caller
    LOST = "lost"            # the connection to the lock manager went away


class Lock:
    """One lock on one resource: `acquire()` it (new request, or a conversion when already
    held), `convert()`, `release()`, `cancel()` a pending request from another task.

    After a grant: `mode` held, fencing `token` (strictly increasing per resource; pass it to
    anything the lock protects), the value block as read at grant time plus local writes
    (`lvb`), whether it is valid (`lvb_valid`: False after a PW/EX holder died) and its
    sequence number (`lvb_seq`).
    """

    def __init__(self, client: DlmClient, domain: str, name: str, mode: Mode, *,
                 persistent: bool = False, on_blocking: BlockingCallback | None = None) -> None:
        self.client = client
        self.domain = domain
        self.name = name
        self.requested = mode
        self.persistent = persistent
        self.on_blocking = on_blocking
        self.mode: Mode | None = None
        self.token: int | None = None
        self.lvb = bytes(LVB_LEN)
        self.lvb_valid = False
        self.lvb_seq = 0
        self.demoted = False
        self.blocking: Mode | None = None  # highest mode someone waits for since our grant
        self.lost = False
        self._lvb_dirty = False
        self._ref: int | None = None
        self._pending = False
        self._done: Waiter | None = None
        self._outcome: Outcome | None = None
        self._names: tuple[int, bytes] | None = None  # encoded for LOCK frames

    def __repr__(self) -> str:
        held = self.mode.name if self.mode is not None else "not held"
        return f"<Lock {self.domain}/{self.name} {held} token={self.token}>"

    @property
    def held(self) -> bool:
        """Whether the lock is granted now (in any mode)."""
        return self.mode is not None

    async def acquire(self, blocking: bool = True, timeout: float | None = None, *,
                      mode: Mode | str | None = None, flags: Flag = Flag.NONE) -> bool:
        """Take the lock in `mode` (default: the handle's mode), or convert to it when held.

        `blocking=False` is a trylock: it never queues. Returns False when not granted
        (trylock refused, timeout, or cancelled by `cancel()`); nothing stays queued then.
        """
        wanted = Mode.parse(mode) if mode is not None else self.requested
        if self._ref is not None and self.mode is not None:
            return await self.convert(wanted, blocking=blocking, timeout=timeout, flags=flags)
        if self._ref is not None:
            raise DlmError(errno.EBUSY, f"{self!r} already has a request pending")
        if self.persistent:
            flags |= Flag.PERSISTENT
        if not blocking:
            flags |= Flag.NOQUEUE
        client = self.client
        ref = self._ref = client._register(self)
        call_id = client._new_id()
        names = self._names
        if names is None:
            names = self._names = client._lock_names(self.domain, self.name)
        frame = protocol.encode_lock_with(call_id, ref, wanted, flags, names)
        granted = await self._request(call_id, frame, flags, timeout, new=True)
        if self.mode is None and self._ref is not None:
            self.client._unregister(self._ref)
            self._ref = None
        return granted

    async def convert(self, mode: Mode | str, *, blocking: bool = True,
                      timeout: float | None = None, flags: Flag = Flag.NONE) -> bool:
        """Change the held mode. Down-conversions are granted at once; an up-conversion may
        wait (bounded by `timeout`), and when it is not granted the old mode is kept.
        Raises DlmError(EDEADLK) on a conversion deadlock (unless flags has CONVDEADLK)."""
        wanted = Mode.parse(mode)
        if self._ref is None or self.mode is None:
            raise DlmError(errno.ENOLCK, f"{self!r} is not held")
        if not blocking:
            flags |= Flag.NOQUEUE
        writes = self._lvb_dirty and lvb_action(self.mode, wanted) is LvbAction.WRITE
        call_id = self.client._new_id()
        frame = protocol.encode_convert(call_id, self._ref, wanted, flags,
                                        self.lvb if writes else None)
        granted = await self._request(call_id, frame, flags, timeout, new=False)
        if granted and writes:
            self._lvb_dirty = False
        return granted

    async def release(self, *, invalidate_lvb: bool = False, wait: bool = False) -> None:
        """Unlock. A PW/EX holder's changed value block is stored (or, with `invalidate_lvb`,
        the value block is marked invalid). A pending request is cancelled first.

        The unlock is sent without waiting for the service's answer: anything this client
        asks afterwards is handled after it (a new lock sees it released, with its value
        block), and closing the connection sends it first. Another process sees the lock
        free once the service has handled it; with `wait=True` (or after `client.sync()`)
        that has happened when this returns -- use it before telling anyone else out of
        band that the lock is free. On a connection made with `prompt_unlock=True`,
        `wait=True` returns as soon as the unlock is in the socket: the service then handles
        it before any request sent afterwards by anyone, which is the same promise without
        the round trip."""
        if self._pending:
            await self.cancel()
        ref = self._ref
        if ref is None or self.mode is None:
            return
        client = self.client
        lvb = None
        if invalidate_lvb:
            flags = Flag.IVVALBLK
        else:
            flags = Flag.NONE
            if self._lvb_dirty and self.mode >= Mode.PW:
                lvb = self.lvb
        call_id = client._new_id()
        prompt = wait and client.prompt_unlock
        frame = protocol.encode_unlock(call_id, ref, flags, lvb, quiet=prompt)
        self._forget()
        try:
            if prompt:
                # The service handles what this connection sent before anyone's later
                # request: handing the unlock to the kernel is enough (and it is quiet: no
                # reply to wake us for, unless it fails).
                if not client._send_quiet(call_id, frame):
                    await client.sync()  # the kernel's buffer was full: wait it out
            elif wait:
                await client._roundtrip(call_id, frame)
            else:
                client._send_unanswered(call_id, frame)
        except DlmError as err:
            if err.errno != errno.ENOTCONN:
                raise

    async def cancel(self) -> None:
        """Take back a pending request or conversion (its `acquire()` returns False). Does
        nothing when there is none, or when it was granted meanwhile."""
        if self._ref is None:
            return
        try:
            await self._cancel_request(self._ref)
        except DlmError as err:
            if err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTCONN):
                raise

    async def _cancel_request(self, ref: int) -> None:
        client = self.client
        call_id = client._new_id()
        await client._roundtrip(call_id, protocol.encode_cancel(call_id, ref))

    def write_lvb(self, data: bytes, offset: int = 0) -> int:
        """Change the local copy of the value block; it reaches the resource when this PW/EX
        lock converts down or is released. Returns how many bytes were taken (the value block
        is 64 bytes: longer data is truncated, an offset at or past the end is ENOSPC)."""
        if self.mode is None or self.mode < Mode.PW:
            raise DlmError(errno.EBADF, "only a PW or EX holder may write the value block")
        if offset >= LVB_LEN:
            raise DlmError(errno.ENOSPC, "the value block is 64 bytes")
        data = bytes(data[:LVB_LEN - offset])
        self.lvb = self.lvb[:offset] + data + self.lvb[offset + len(data):]
        self.lvb_valid = True
        self._lvb_dirty = True
        return len(data)

    async def contenders(self) -> list[str]:
        """Owners holding or waiting for this resource, holders first (kazoo's name)."""
        status = await self.client.status()
        for domain in status["domains"]:
            if domain["name"] != self.domain:
                continue
            for res in domain["resources"]:
                if res["name"] == self.name:
                    return [lk["owner"] or f"orphan of {lk['orphan_of']}"
                            for queue in ("granted", "converting", "waiting")
                            for lk in res[queue]]
        return []

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        with anyio.CancelScope(shield=True):
            await self.release()

    # -- plumbing ----------------------------------------------------------------------------

    async def _request(self, call_id: int, frame: bytes, flags: Flag, timeout: float | None,
                       new: bool) -> bool:
        """Send a lock/convert request and wait for its outcome; on timeout or cancellation,
        cancel it at the service so that it does not stay queued."""
        self._done = None
        self._outcome = None
        self._pending = True
        try:
            await self.client._roundtrip(call_id, frame)
            # A grant at once arrives with the reply (or in it): then there is nothing more
            # to wait for. Otherwise the request is queued: wait for its grant or cancel.
            if self._outcome is None:
                done = self._done = self.client._io.future()
                with anyio.move_on_after(timeout):
                    await done.wait()
                if self._outcome is None:
                    with anyio.CancelScope(shield=True):
                        await self._abort(give_back=False)
        except DlmError as err:
            if err.errno == errno.EAGAIN and flags & Flag.NOQUEUE:
                return False
            raise
        except BaseException:
            # Our caller is cancelled: a new lock granted in the race is given back; a
            # conversion granted in the race stays (the caller held the lock before).
            with anyio.CancelScope(shield=True):
                await self._abort(give_back=new)
            raise
        finally:
            self._pending = False
        if self._outcome is Outcome.LOST:
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")
        return self._outcome is Outcome.GRANTED

    async def _abort(self, give_back: bool) -> None:
        """Cancel the pending request. A grant that won the race is kept (after a timeout the
        caller then gets True) or, with `give_back`, released."""
        try:
            if self._ref is None:
                return
            if self._done is None and self._outcome is None:
                self._done = self.client._io.future()
            done = self._done
            await self._cancel_request(self._ref)
            if done is not None and self._outcome is None:
                await done.wait()  # the cancel event follows the reply
        except DlmError as err:
            if err.errno == errno.EBUSY and give_back and self.mode is not None:
                self._pending = False
                await self.release()
            elif err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTCONN):
                raise

    def _granted(self, grant: GrantEvent) -> None:
        self.mode = grant.mode
        self.token = grant.token
        if grant.lvb is not None:
            self.lvb = grant.lvb
            self._lvb_dirty = False
        self.lvb_valid = grant.lvb_valid
        self.lvb_seq = grant.lvb_seq
        self.demoted = grant.demoted
        self.blocking = None
        self._outcome = Outcome.GRANTED
        if self._done is not None:
            self._done.settle(True)

    def _cancelled(self, mode: Mode | None) -> None:
        if mode is None:
            self._forget()
        else:
            self.mode = mode
        self._outcome = Outcome.CANCELLED
        if self._done is not None:
            self._done.settle(False)

    def _bast(self, mode: Mode) -> None:
        self.blocking = mode if self.blocking is None else max(self.blocking, mode)
        if self.on_blocking is not None:
            try:
                self.on_blocking(self, mode)
            except Exception:
                log.exception("blocking callback of %r failed", self)

    def _lost(self) -> None:
        self.lost = True
        self.mode = None
        self._ref = None
        self._outcome = Outcome.LOST
        if self._done is not None:
            self._done.settle(None)

    def _forget(self) -> None:
        if self._ref is not None:
            self.client._unregister(self._ref)
        self._ref = None
        self.mode = None
        self.token = None


