"""Client for the lock manager, for asyncio and trio alike.

Why anyio: the same client must run inside the NBD daemon and automounter (asyncio) and inside
dlmfs (trio, under pyfuse3). Written once against anyio, it uses each loop natively, and --
what a sync socket used through `trio.to_thread` could not give -- a waiting `acquire()` can be
cancelled or timed out by the caller's own cancel scope, and the cancellation reaches the
service (a CANCEL is sent), so no abandoned request stays queued in front of other waiters.

Full-mode API (VMS-style), kazoo-shaped where kazoo has a name for it::

    async with connect("unix:///run/minidisk/dlm.sock", name="backup") as dlm:
        lock = dlm.lock("disks", "vm1", Mode.EX, on_blocking=lambda lk, mode: ...)
        if await lock.acquire(timeout=5):            # False on timeout (then nothing is queued)
            print(lock.token, lock.lvb, lock.lvb_valid)
            lock.write_lvb(b"generation=7")           # stored when a PW/EX holder lets go
            await lock.convert(Mode.PR)               # down: immediate, writes the value block
            await lock.release()
        async with dlm.lock("disks", "vm2", Mode.PR):  # acquire/release as a context
            ...

libo2dlm-shaped API::

    ctx = await dlm.initialize("domain")
    await ctx.lock("id", Mode.EX, trylock=True)       # TrylockFailed (ETXTBSY) if busy
    await ctx.write_lvb("id", b"data"); await ctx.unlock("id")
    await ctx.read_lvb("id")                          # LvbInvalid when invalid
    await ctx.drop("id"); await ctx.destroy()

Blocking notifications (`on_blocking`) run synchronously in the client's reader task: they
must not block; set an event or start a task instead.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from minidisk.dlm import protocol
from minidisk.dlm.engine import LVB_LEN, DlmError, Flag
from minidisk.dlm.modes import LvbAction, Mode, lvb_action

log = logging.getLogger("minidisk.dlm.client")

BlockingCallback = Callable[["Lock", Mode], None]


class _Call:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply: dict[str, Any] | None = None


class DlmClient:
    """One connection to the lock manager: one lock owner. Make it with `connect()`."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._send_lock = anyio.Lock()
        self._decoder = protocol.FrameDecoder()
        self._calls: dict[int, _Call] = {}
        self._locks: dict[int, Lock] = {}
        self._next_id = 1
        self._next_ref = 1
        self.closed = False
        self.server: dict[str, Any] = {}
        self.on_lost: Callable[[], None] | None = None  # called once if the connection drops

    # -- full-mode API -----------------------------------------------------------------------

    def lock(self, domain: str, name: str, mode: Mode | str = Mode.EX, *,
             persistent: bool = False, on_blocking: BlockingCallback | None = None) -> Lock:
        """A lock handle; nothing is requested until `acquire()`."""
        return Lock(self, domain, name, Mode.parse(mode), persistent=persistent,
                    on_blocking=on_blocking)

    async def join(self, domain: str) -> None:
        await self._call("join", domain=domain)

    async def leave(self, domain: str) -> None:
        await self._call("leave", domain=domain)

    async def drop(self, domain: str, name: str) -> None:
        """Forget a resource and its value block (EBUSY while anyone has a lock on it)."""
        await self._call("drop", domain=domain, name=name)

    async def status(self) -> dict[str, Any]:
        reply = await self._call("status")
        return {"domains": reply["domains"], "clients": reply["clients"]}

    async def purge(self, domain: str | None = None, pid: int | None = None) -> int:
        """Remove orphans (PERSISTENT locks of dead owners); returns how many."""
        args: dict[str, Any] = {}
        if domain is not None:
            args["domain"] = domain
        if pid is not None:
            args["pid"] = pid
        reply = await self._call("purge", **args)
        return int(reply["purged"])

    async def initialize(self, domain: str) -> O2dlmDomain:
        """libo2dlm's `o2dlm_initialize`: join `domain` and return its context."""
        await self.join(domain)
        return O2dlmDomain(self, domain)

    async def aclose(self) -> None:
        self.closed = True
        await self._stream.aclose()

    # -- plumbing ----------------------------------------------------------------------------

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        if self.closed:
            raise DlmError(errno.ENOTCONN, "not connected to the lock manager")
        call_id = self._next_id
        self._next_id += 1
        call = self._calls[call_id] = _Call()
        try:
            data = protocol.encode({"id": call_id, "op": op, **args})
            async with self._send_lock:
                await self._stream.send(data)
            await call.done.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost") from None
        finally:
            self._calls.pop(call_id, None)
        reply = call.reply
        if reply is None:
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")
        if not reply.get("ok"):
            raise DlmError(int(reply["errno"]), str(reply.get("error", "")))
        return reply

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive(1 << 16)
                for message in self._decoder.feed(data):
                    self._dispatch(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError, protocol.ProtocolError) as err:
            if not self.closed:
                log.warning("lock manager connection lost: %r", err)
        finally:
            self._lost(unexpected=not self.closed)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            call = self._calls.get(message["id"])
            if call is not None:
                call.reply = message
                call.done.set()
            return
        lock = self._locks.get(message.get("ref", -1))
        if lock is not None:
            lock._event(message)

    def _lost(self, unexpected: bool) -> None:
        self.closed = True
        for call in self._calls.values():
            call.done.set()
        for lock in list(self._locks.values()):
            lock._lost()
        self._locks.clear()
        if unexpected and self.on_lost is not None:
            self.on_lost()

    def _register(self, lock: Lock) -> int:
        ref = self._next_ref
        self._next_ref += 1
        self._locks[ref] = lock
        return ref

    def _unregister(self, ref: int) -> None:
        self._locks.pop(ref, None)


@asynccontextmanager
async def connect(url: str | None = None, *, name: str | None = None
                  ) -> AsyncIterator[DlmClient]:
    """Connect to the lock manager at `url` (see `protocol.socket_path`). Leaving the block
    closes the connection, which releases every lock still held."""
    stream = await anyio.connect_unix(protocol.socket_path(url))
    client = DlmClient(stream)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client._read_loop)
            try:
                client.server = await client._call("hello", name=name or f"pid {os.getpid()}")
                yield client
            finally:
                client.closed = True
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task never raises, so the group only carries what the body raised:
        # hand that on as itself, not wrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


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
        self._done = anyio.Event()
        self._outcome: str | None = None

    def __repr__(self) -> str:
        held = self.mode.name if self.mode is not None else "not held"
        return f"<Lock {self.domain}/{self.name} {held} token={self.token}>"

    @property
    def held(self) -> bool:
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
        self._ref = self.client._register(self)
        message = {"ref": self._ref, "domain": self.domain, "name": self.name,
                   "mode": wanted.name, "flags": protocol.flags_to_wire(flags)}
        granted = await self._request("lock", message, timeout, new=True)
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
        message: dict[str, Any] = {"ref": self._ref, "mode": wanted.name,
                                   "flags": protocol.flags_to_wire(flags)}
        writes = self._lvb_dirty and lvb_action(self.mode, wanted) is LvbAction.WRITE
        if writes:
            message["lvb"] = self.lvb.hex()
        granted = await self._request("convert", message, timeout, new=False)
        if granted and writes:
            self._lvb_dirty = False
        return granted

    async def release(self, *, invalidate_lvb: bool = False) -> None:
        """Unlock. A PW/EX holder's changed value block is stored (or, with `invalidate_lvb`,
        the value block is marked invalid). A pending request is cancelled first."""
        if self._pending:
            await self.cancel()
        if self._ref is None or self.mode is None:
            return
        message: dict[str, Any] = {"ref": self._ref, "flags": []}
        if invalidate_lvb:
            message["flags"] = protocol.flags_to_wire(Flag.IVVALBLK)
        elif self._lvb_dirty and self.mode >= Mode.PW:
            message["lvb"] = self.lvb.hex()
        try:
            await self.client._call("unlock", **message)
        except DlmError as err:
            if err.errno != errno.ENOTCONN:
                raise
        self._forget()

    async def cancel(self) -> None:
        """Take back a pending request or conversion (its `acquire()` returns False). Does
        nothing when there is none, or when it was granted meanwhile."""
        if self._ref is None:
            return
        try:
            await self.client._call("cancel", ref=self._ref)
        except DlmError as err:
            if err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTCONN):
                raise

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

    async def _request(self, op: str, message: dict[str, Any], timeout: float | None,
                       new: bool) -> bool:
        """Send a lock/convert request and wait for its outcome; on timeout or cancellation,
        cancel it at the service so that it does not stay queued."""
        self._done = anyio.Event()
        self._outcome = None
        self._pending = True
        try:
            await self.client._call(op, **message)
            with anyio.move_on_after(timeout):
                await self._done.wait()
            if self._outcome is None:
                with anyio.CancelScope(shield=True):
                    await self._abort(give_back=False)
        except DlmError as err:
            if err.errno == errno.EAGAIN and Flag.NOQUEUE.name in message["flags"]:
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
        if self._outcome == "lost":
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")
        return self._outcome == "granted"

    async def _abort(self, give_back: bool) -> None:
        """Cancel the pending request. A grant that won the race is kept (after a timeout the
        caller then gets True) or, with `give_back`, released."""
        try:
            await self.client._call("cancel", ref=self._ref)
            await self._done.wait()  # the cancel event follows the reply
        except DlmError as err:
            if err.errno == errno.EBUSY and give_back and self.mode is not None:
                self._pending = False
                await self.release()
            elif err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTCONN):
                raise

    def _event(self, message: dict[str, Any]) -> None:
        kind = message.get("ev")
        if kind == "grant":
            self.mode = Mode[message["mode"]]
            self.token = int(message["token"])
            if message.get("lvb") is not None:
                self.lvb = bytes.fromhex(message["lvb"])
                self._lvb_dirty = False
            self.lvb_valid = bool(message["valid"])
            self.lvb_seq = int(message["seq"])
            self.demoted = bool(message.get("demoted"))
            self.blocking = None
            self._outcome = "granted"
            self._done.set()
        elif kind == "cancel":
            if message.get("mode") is None:
                self._forget()
            else:
                self.mode = Mode[message["mode"]]
            self._outcome = "cancelled"
            self._done.set()
        elif kind == "bast":
            mode = Mode[message["mode"]]
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
        self._outcome = "lost"
        self._done.set()

    def _forget(self) -> None:
        if self._ref is not None:
            self.client._unregister(self._ref)
        self._ref = None
        self.mode = None
        self.token = None


class TrylockFailed(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.ETXTBSY, f"{lock_id!r} is busy")


class RecursiveLock(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.EDEADLK, f"{lock_id!r} is already locked by this context")


class LvbInvalid(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.ENODATA, f"the value block of {lock_id!r} is invalid")


class BusyLock(DlmError):
    def __init__(self, lock_id: str) -> None:
        super().__init__(errno.EBUSY, f"{lock_id!r} is in use")


class O2dlmDomain:
    """libo2dlm's context for one domain: PR/EX locks by id, the value block, drop, destroy.

    Errors follow libo2dlm's: TrylockFailed (O2DLM_ET_TRYLOCK_FAILED), RecursiveLock,
    LvbInvalid, BusyLock (O2DLM_ET_BUSY_LOCK); ids are < 32 bytes and must not start with
    "." (reserved). Membership of the domain, not libo2dlm's private ".%016x" PR lock, is what
    keeps the domain alive while the context is in use.
    """

    def __init__(self, client: DlmClient, domain: str) -> None:
        self.client = client
        self.domain = domain
        self._locks: dict[str, Lock] = {}

    def _check(self, lock_id: str) -> None:
        raw = lock_id.encode()
        if not raw or len(raw) >= 32 or lock_id.startswith("."):
            raise DlmError(errno.EINVAL, f"bad lock id {lock_id!r}")

    def _held(self, lock_id: str) -> Lock:
        lock = self._locks.get(lock_id)
        if lock is None:
            raise DlmError(errno.ENOENT, f"{lock_id!r} is not locked by this context")
        return lock

    async def lock(self, lock_id: str, level: Mode | str, trylock: bool = False) -> None:
        self._check(lock_id)
        mode = Mode.parse(level)
        if mode not in (Mode.PR, Mode.EX):
            raise DlmError(errno.EINVAL, "libo2dlm levels are PR and EX")
        if lock_id in self._locks:
            raise RecursiveLock(lock_id)
        lock = self.client.lock(self.domain, lock_id, mode)
        if not await lock.acquire(blocking=not trylock):
            raise TrylockFailed(lock_id)
        self._locks[lock_id] = lock

    async def unlock(self, lock_id: str) -> None:
        await self._held(lock_id).release()
        del self._locks[lock_id]

    async def read_lvb(self, lock_id: str) -> bytes:
        lock = self._held(lock_id)
        if not lock.lvb_valid:
            raise LvbInvalid(lock_id)
        return lock.lvb

    async def write_lvb(self, lock_id: str, data: bytes) -> int:
        return self._held(lock_id).write_lvb(data)

    async def drop(self, lock_id: str) -> None:
        self._check(lock_id)
        if lock_id in self._locks:
            raise BusyLock(lock_id)
        try:
            await self.client.drop(self.domain, lock_id)
        except DlmError as err:
            if err.errno == errno.EBUSY:
                raise BusyLock(lock_id) from None
            if err.errno != errno.ENOENT:
                raise

    async def destroy(self) -> None:
        """Unlock everything, drop every resource this context locked, leave the domain."""
        for lock_id in list(self._locks):
            await self.unlock(lock_id)
            await self.drop(lock_id)
        await self.client.leave(self.domain)
