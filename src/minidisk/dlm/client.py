"""The connection to the lock manager (one lock owner), for asyncio and trio alike; kazoo's
split: this is its client and connection, `lock.py` the Lock recipe, `o2dlm.py` the libo2dlm
face, `loops.py` the per-loop handlers.

Why anyio: the same client must run inside the NBD daemon and automounter (asyncio) and inside
dlmfs (trio, under pyfuse3). Written once against anyio, it uses each loop natively, and --
what a sync socket used through `trio.to_thread` could not give -- a waiting `acquire()` can be
cancelled or timed out by the caller's own cancel scope, and the cancellation reaches the
service (a CANCEL is sent), so no abandoned request stays queued in front of other waiters.

Speed: anyio's cancel scopes are kept, but its streams are not used: the client owns a
non-blocking socket and watches it natively (`loops`), requests use the binary frames of
`protocol`, and each waits on one future. `release()` does not wait for its answer: the unlock
leaves at the end of the loop step, in the same write as whatever is asked next (so a
lock+unlock cycle is one round trip), the service handles a connection's requests in order
(the next lock sees the unlock), and closing the connection waits for the answer to the last
such unlock first. Use `release(wait=True)` or `client.sync()` before telling another process
out of band that a lock is free. A lock granted at once comes back as one GRANTED reply (the
`granted-reply` feature). With `connect(..., prompt_unlock=True)` the service handles what the
connection has written before anyone's later request, so `release(wait=True)` returns once
the unlock is written (dlmfs's close uses this). Replies are read into a buffer kept per
connection.

Full-mode API (VMS-style), kazoo-shaped where kazoo has a name for it::

    async with connect("unix:///run/minidisk/dlm.sock", name="backup") as dlm:
        lock = dlm.lock("disks", "vm1", Mode.EX, on_blocking=lambda lk, mode: ...)
        if await lock.acquire(timeout=5):            # False on timeout (then nothing is queued)
            print(lock.token, lock.lvb, lock.lvb_valid)
            lock.write_lvb(b"generation=7")           # stored when a PW/EX holder lets go
            await lock.convert(Mode.PR)               # down: immediate, writes the value block
            await lock.release()                      # sent; release(wait=True) waits
        async with dlm.lock("disks", "vm2", Mode.PR):  # acquire/release as a context
            ...

libo2dlm-shaped: `ctx = await dlm.initialize("domain")` (see `o2dlm`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from minidisk import busypoll
from minidisk.dlm import protocol
from minidisk.dlm.engine import DlmError
from minidisk.dlm.lock import BlockingCallback, Lock
from minidisk.dlm.loops import LoopIo, Waiter, connect_unix, loop_io
from minidisk.dlm.messages import (
    BastEvent,
    CancelEvent,
    ErrorReply,
    GrantedReply,
    GrantEvent,
    JsonReply,
    OkReply,
)
from minidisk.dlm.modes import Mode
from minidisk.dlm.o2dlm import O2dlmDomain

log = logging.getLogger("minidisk.dlm.client")

_RECV_SIZE = 1 << 18
_CLOSE_FLUSH_S = 5.0  # longest a close waits to hand buffered requests to the kernel
_U32 = 0xFFFFFFFF


class NoLockManagerError(ConnectionError):
    """Nothing listens at the lock manager's socket: it was never started, or it stopped."""

    def __init__(self, path: str, err: OSError) -> None:
        super().__init__(err.errno, f"no lock manager at unix://{path} ({err.strerror}): "
                                    "start `minidisk dlm serve`")
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class DlmClient:
    """One connection to the lock manager: one lock owner. Make it with `connect()`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._busy_poll = busypoll.budget_from_env()
        self._io: LoopIo = loop_io(self, sock, self._busy_poll)
        self._decoder = protocol.FrameDecoder()
        self._recv_buffer = bytearray(_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        self._calls: dict[int, Waiter] = {}
        self._locks: dict[int, Lock] = {}
        self._out: list[bytes] = []  # not handed to the kernel yet
        self.blocked = False  # the kernel's buffer is full
        self._flush_scheduled = False
        self._next_id = 1
        self._next_ref = 1
        self._names: dict[tuple[str, str], tuple[int, bytes]] = {}
        self.closed = False
        self._shut = False
        self._unanswered: int | None = None  # the last request sent without waiting
        self._quiet: int | None = None  # the last quiet request not known handled yet
        self._lost_reported = False
        self._refusal: DlmError | None = None  # why the service hung up, if it said
        self._name = ""
        self.server: dict[str, Any] = {}
        self.on_lost: Callable[[], None] | None = None  # called once if the connection drops
        self.prompt_unlock = False  # the service accepted the prompt-unlock feature

    # -- full-mode API -----------------------------------------------------------------------

    def lock(self, domain: str, name: str, mode: Mode | str = Mode.EX, *,
             persistent: bool = False, on_blocking: BlockingCallback | None = None) -> Lock:
        """A lock handle; nothing is requested until `acquire()`."""
        return Lock(self, domain, name, Mode.parse(mode), persistent=persistent,
                    on_blocking=on_blocking)

    async def join(self, domain: str) -> None:
        """Become a member of `domain` (as dlmfs's mkdir; locks join it by themselves)."""
        await self._call("join", domain=domain)

    async def leave(self, domain: str) -> None:
        """Stop being a member of `domain` (EBUSY while this client holds locks in it)."""
        await self._call("leave", domain=domain)

    async def drop(self, domain: str, name: str) -> None:
        """Forget a resource and its value block (EBUSY while anyone has a lock on it)."""
        await self._call("drop", domain=domain, name=name)

    async def status(self) -> dict[str, Any]:
        """Every domain, resource and lock, and the clients: the service's pages (one per
        `service.STATUS_PAGE` bytes) put together. Not atomic when it takes several pages:
        what changes meanwhile may show half-way."""
        reply = await self._call("status")
        status = {"domains": reply["domains"], "clients": reply["clients"]}
        while reply.get("next") is not None:
            reply = await self._call("status", after=reply["next"])
            _merge_status_page(status["domains"], reply["domains"])
        return status

    async def purge(self, domain: str | None = None, pid: int | None = None) -> int:
        """Remove orphans (PERSISTENT locks of dead owners); returns how many."""
        args: dict[str, Any] = {}
        if domain is not None:
            args["domain"] = domain
        if pid is not None:
            args["pid"] = pid
        reply = await self._call("purge", **args)
        return int(reply["purged"])

    async def sync(self) -> None:
        """Wait until the service has handled every request sent so far (unlocks included,
        which `release()` does not wait for)."""
        await self._call("hello", name=self._name)

    async def initialize(self, domain: str) -> O2dlmDomain:
        """libo2dlm's `o2dlm_initialize`: join `domain` and return its context."""
        await self.join(domain)
        return O2dlmDomain(self, domain)

    async def aclose(self) -> None:
        """Close the connection (after handing every request already made to the kernel):
        the service releases every lock still held."""
        if self._shut:
            return
        self._shut = True
        self.flush_deferred()
        last = self._unanswered
        if last is not None and not self.closed:
            # Wait for the answer to the last unlock sent without waiting: closing first
            # could make the service see the connection reset (writing an event to it)
            # before it has read the unlock, and drop the lock as its holder's death.
            waiter = self._calls.setdefault(last, self._io.future())
            with anyio.move_on_after(_CLOSE_FLUSH_S):
                await waiter.wait()
        if self._quiet is not None and not self.closed:
            # The same for a quiet unlock, which has no answer: ask for one after it.
            with anyio.move_on_after(_CLOSE_FLUSH_S):
                try:
                    await self.sync()
                except DlmError:
                    pass
        self.closed = True
        self._flush_at_close()
        self._io.stop()
        self._sock.close()
        self._lost(unexpected=False)

    # -- plumbing ----------------------------------------------------------------------------

    def expecting(self) -> bool:
        """Is a reply due? (The loop adapter busy-polls only then.)"""
        return bool(self._calls)

    def _new_id(self) -> int:
        call_id = self._next_id
        self._next_id = (call_id + 1) & _U32 or 1
        return call_id

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        """A JSON request; its reply."""
        call_id = self._new_id()
        fields: dict[str, Any] = await self._roundtrip(
            call_id, protocol.encode({"id": call_id, "op": op, **args}))
        return fields

    async def _roundtrip(self, call_id: int, frame: bytes) -> Any:
        """Send a request frame and wait for its reply: a JSON reply's fields, or the lkid of
        an OK or GRANTED (0 unless a LOCK); a failure is raised as DlmError."""
        if self.closed:
            raise DlmError(errno.ENOTCONN, "not connected to the lock manager")
        waiter = self._calls[call_id] = self._io.future()
        try:
            self._write(frame)
            # The reply usually comes within tens of microseconds: catch it awake.
            self._io.poller.poke()
            reply = await waiter.wait()
        finally:
            self._calls.pop(call_id, None)
        if reply is None:
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")
        if isinstance(reply, DlmError):
            raise DlmError(reply.errno or errno.EIO, reply.detail)
        return reply

    def _send_unanswered(self, call_id: int, frame: bytes) -> None:
        """Send a request whose reply nobody waits for (an error in it is logged). It leaves
        at the end of this step of the loop, with whatever is asked meanwhile -- typically
        an unlock and the next lock in one write, which wakes the service once."""
        self._write(frame, defer=True)
        self._unanswered = call_id

    def _send_quiet(self, call_id: int, frame: bytes) -> bool:
        """Send a quiet request (answered only if it fails) now, with anything deferred
        before it; True once all of it is in the kernel (False: the kernel's buffer was full
        and the rest waits, so the caller must wait, e.g. with `sync()`)."""
        self._write(frame)
        self._quiet = call_id
        return not self._out

    def _answered(self, call_id: int) -> None:
        """A reply to `call_id` arrived: every request sent before it was handled too."""
        if call_id == self._unanswered:
            self._unanswered = None
        quiet = self._quiet
        if quiet is not None and (call_id - quiet) & _U32 < 0x80000000:
            self._quiet = None

    def _write(self, frame: bytes, defer: bool = False) -> None:
        if self.closed:
            raise DlmError(errno.ENOTCONN, "not connected to the lock manager")
        self._out.append(frame)
        if self.blocked:
            return
        if defer:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._io.schedule_flush()
            return
        self.write_pending()
        if self.closed:
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")

    def flush_deferred(self) -> None:
        """Write out the requests queued this loop iteration (scheduled by the client)."""
        self._flush_scheduled = False
        if self._out and not self.blocked and not self.closed:
            self.write_pending()

    def write_pending(self) -> bool:
        """Hand buffered requests to the kernel; True once none is left (False: the rest
        waits until the socket is writable)."""
        out = self._out
        if not out:
            self.blocked = False
            return True
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            out.clear()
            self.blocked = False
            self._lost(unexpected=True)
            return True
        if sent == len(data):
            out.clear()
            self.blocked = False
            return True
        out[:] = [data[sent:]]
        if not self.blocked:
            self.blocked = True
            self._io.want_write()
        return False

    def _flush_at_close(self) -> None:
        if not self._out:
            return
        try:
            self._sock.settimeout(_CLOSE_FLUSH_S)
            self._sock.sendall(b"".join(self._out))
        except OSError as err:
            log.warning("lock manager: requests lost at close: %r", err)
        self._out.clear()

    def on_readable(self) -> bool:
        """Read what arrived and dispatch it; False once the connection is gone."""
        try:
            # Into a buffer kept for the connection: recv() of a fresh 256 KiB object costs
            # an mmap, an mremap and a munmap on every call.
            size = self._sock.recv_into(self._recv_buffer)
            data = self._recv_view[:size].tobytes()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as err:
            return self._read_failed(err)
        if not data:
            return self._read_failed(EOFError("end of stream"))
        try:
            bodies = self._decoder.feed(data)
        except protocol.ProtocolError as err:
            return self._read_failed(err)
        for body in bodies:
            try:
                self._dispatch(body)
            except protocol.ProtocolError as err:
                return self._read_failed(err)
        return True

    def _read_failed(self, err: BaseException) -> bool:
        self._io.stop_reading()
        if not self.closed:
            log.warning("lock manager connection lost: %r", err)
            self._lost(unexpected=True)
        return False

    def _dispatch(self, body: bytes) -> None:
        message = protocol.decode_reply(body)
        if type(message) is OkReply:
            self._settle(message.call_id, message.lkid)
        elif type(message) is GrantedReply:  # OK and GRANT in one: granted at once
            lock = self._locks.get(message.ref)
            if lock is not None:
                lock._granted(message)
            self._settle(message.call_id, message.lkid)
        elif type(message) is GrantEvent:
            lock = self._locks.get(message.ref)
            if lock is not None:
                lock._granted(message)
        elif type(message) is ErrorReply:
            error = DlmError(message.errno, message.detail)
            if message.call_id == 0:  # no request has id 0: the service refuses the connection
                self._refusal = error
            elif not self._settle(message.call_id, error):
                log.warning("lock manager: a request not waited for failed: %s", error)
        elif type(message) is CancelEvent:
            lock = self._locks.get(message.ref)
            if lock is not None:
                lock._cancelled(message.mode)
        elif type(message) is BastEvent:
            lock = self._locks.get(message.ref)
            if lock is not None:
                lock._bast(message.mode)
        elif type(message) is JsonReply:
            self._settle(message.call_id, message.fields)

    def _settle(self, call_id: int, value: Any) -> bool:
        """The reply to `call_id` arrived (every request sent before it was handled too): hand
        `value` to its waiter; False when nobody waits for it."""
        self._answered(call_id)
        waiter = self._calls.get(call_id)
        if waiter is None:
            return False
        waiter.settle(value)
        return True

    def _lost(self, unexpected: bool) -> None:
        self.closed = True
        for waiter in self._calls.values():
            waiter.settle(self._refusal)
        for lock in list(self._locks.values()):
            lock._lost()
        self._locks.clear()
        if unexpected and not self._lost_reported and self.on_lost is not None:
            self._lost_reported = True
            self.on_lost()

    def _lock_names(self, domain: str, name: str) -> tuple[int, bytes]:
        """`protocol.lock_names`, remembered for the resources locked recently (dlmfs makes
        a new `Lock` at every open of the same file)."""
        key = (domain, name)
        names = self._names.get(key)
        if names is None:
            if len(self._names) >= 1024:
                self._names.clear()
            names = self._names[key] = protocol.lock_names(domain, name)
        return names

    def _register(self, lock: Lock) -> int:
        ref = self._next_ref
        while ref in self._locks or not ref:
            ref = (ref + 1) & _U32
        self._next_ref = (ref + 1) & _U32
        self._locks[ref] = lock
        return ref

    def _unregister(self, ref: int) -> None:
        self._locks.pop(ref, None)


def _merge_status_page(domains: list[dict[str, Any]], page: list[dict[str, Any]]) -> None:
    """Append a status page's domains to `domains`; a domain or resource marked "continued"
    goes on from the last one of the previous page."""
    for dom in page:
        if dom.get("continued") and domains and domains[-1]["name"] == dom["name"]:
            resources = domains[-1]["resources"]
            for res in dom["resources"]:
                if res.get("continued") and resources and resources[-1]["name"] == res["name"]:
                    for queue in ("granted", "converting", "waiting"):
                        resources[-1][queue] += res[queue]
                else:
                    resources.append(res)
        else:
            domains.append(dom)


@asynccontextmanager
async def connect(url: str | None = None, *, name: str | None = None,
                  prompt_unlock: bool = False) -> AsyncIterator[DlmClient]:
    """Connect to the lock manager at `url` (see `protocol.socket_path`). Leaving the block
    closes the connection, which releases every lock still held.

    `prompt_unlock`: ask the service to handle what this connection has sent before any
    other connection's later requests, so that `release(wait=True)` need not wait for the
    reply (see `Lock.release`). It costs the service a read of this socket whenever another
    client writes, so it is for a few busy connections (a dlmfs mount), not for every one;
    `client.prompt_unlock` says whether the service agreed."""
    path = protocol.socket_path(url)
    try:
        sock = await connect_unix(path)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        raise NoLockManagerError(path, err) from None
    client = DlmClient(sock)
    try:
        async with anyio.create_task_group() as tasks:
            await client._io.run(tasks)
            try:
                client._name = name or f"pid {os.getpid()}"
                features = [protocol.FEATURE_GRANTED_REPLY]
                if prompt_unlock:
                    features.append(protocol.FEATURE_PROMPT_UNLOCK)
                client.server = await client._call("hello", name=client._name,
                                                   features=features)
                client.prompt_unlock = protocol.FEATURE_PROMPT_UNLOCK in client.server.get(
                    "features", [])
                yield client
            finally:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task never raises, so the group only carries what the body raised:
        # hand that on as itself, not wrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
