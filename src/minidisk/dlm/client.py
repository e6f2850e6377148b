"""Client for the lock manager, for asyncio and trio alike.

Why anyio: the same client must run inside the NBD daemon and automounter (asyncio) and inside
dlmfs (trio, under pyfuse3). Written once against anyio, it uses each loop natively, and --
what a sync socket used through `trio.to_thread` could not give -- a waiting `acquire()` can be
cancelled or timed out by the caller's own cancel scope, and the cancellation reaches the
service (a CANCEL is sent), so no abandoned request stays queued in front of other waiters.

Speed: anyio's cancel scopes are kept, but its streams are not used: the client owns a
non-blocking socket and watches it natively (an asyncio reader callback, or one trio task),
requests use the binary frames of `protocol`, and each waits on one future. `release()` does
not wait for its answer: the unlock leaves at the end of the loop step, in the same write as
whatever is asked next (so a lock+unlock cycle is one round trip), the service handles a
connection's requests in order (the next lock sees the unlock), and closing the connection
waits for the answer to the last such unlock first. Use `release(wait=True)` or
`client.sync()` before telling another process out of band that a lock is free. A lock granted
at once comes back as one GRANTED reply (the `granted-reply` feature). With
`connect(..., prompt_unlock=True)` the service handles what the connection has written before
anyone's later request, so `release(wait=True)` returns once the unlock is written (dlmfs's
close uses this). Replies are read into a buffer kept per connection.

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

import asyncio
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Protocol

import anyio

from minidisk import busypoll
from minidisk.dlm import protocol
from minidisk.dlm.engine import LVB_LEN, DlmError, Flag
from minidisk.dlm.modes import LvbAction, Mode, lvb_action

log = logging.getLogger("minidisk.dlm.client")

BlockingCallback = Callable[["Lock", Mode], None]

_MODES = tuple(Mode)
_RECV_SIZE = 1 << 18
_CLOSE_FLUSH_S = 5.0  # longest a close waits to hand buffered requests to the kernel
_U32 = 0xFFFFFFFF


# -- per-loop plumbing -----------------------------------------------------------------------
#
# The client talks to a non-blocking socket of its own, natively on each loop: on asyncio a
# reader callback (no task, no stream object), on trio one reader task. Requests are written
# straight to the socket (buffered only when the kernel's buffer is full). Waiting for a reply
# is one future; both kinds are cancelled by the caller's anyio cancel scope as usual.

class _Waiter(Protocol):
    def settle(self, value: Any) -> None: ...
    def done(self) -> bool: ...
    def wait(self) -> Any: ...  # an awaitable of the value


class _AioFuture(asyncio.Future[Any]):
    """An asyncio future that can be settled twice (the second time is ignored)."""

    __slots__ = ()

    def settle(self, value: Any) -> None:
        if not self.done():
            self.set_result(value)

    def wait(self) -> _AioFuture:
        return self


_trio: Any = None  # the trio module, imported by the first trio client


class _TrioFuture:
    """A one-shot future on trio: the waiting task parks itself and is rescheduled directly
    (cheaper than a `trio.Event`, whose parking lot a single waiter does not need)."""

    __slots__ = ("_done", "_tasks", "_value")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._tasks: list[Any] = []

    def settle(self, value: Any) -> None:
        if not self._done:
            self._done = True
            self._value = value
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                _trio.lowlevel.reschedule(task)

    def done(self) -> bool:
        return self._done

    async def wait(self) -> Any:
        if not self._done:
            lowlevel = _trio.lowlevel
            task = lowlevel.current_task()
            self._tasks.append(task)

            def abort(_: Any) -> Any:
                self._tasks.remove(task)
                return lowlevel.Abort.SUCCEEDED

            await lowlevel.wait_task_rescheduled(abort)
        return self._value


class _Io:
    """What differs between asyncio and trio: waiting for the socket, and futures."""

    poller: busypoll.AsyncioPoller | busypoll.TrioPoller

    def future(self) -> _Waiter:
        raise NotImplementedError

    def want_write(self) -> None:
        """The kernel took only part: call `client._write_pending()` whenever the socket is
        writable, until it returns True."""
        raise NotImplementedError

    def schedule_flush(self) -> None:
        """Call `client._flush_deferred()` soon: at the end of this step of the loop."""
        raise NotImplementedError

    async def run(self, tasks: anyio.abc.TaskGroup) -> None:
        raise NotImplementedError

    def stop_reading(self) -> None:
        """The connection broke: stop watching it."""

    def stop(self) -> None:
        """The socket is about to be closed."""


class _AsyncioIo(_Io):
    def __init__(self, client: DlmClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.fd = client._sock.fileno()
        self.reading = False
        self.poller = busypoll.AsyncioPoller(self.loop, client._busy_poll,
                                             lambda: bool(client._calls))

    def future(self) -> _Waiter:
        return _AioFuture(loop=self.loop)

    async def run(self, tasks: anyio.abc.TaskGroup) -> None:
        self.loop.add_reader(self.fd, self.client._on_readable)
        self.reading = True

    def want_write(self) -> None:
        self.loop.add_writer(self.fd, self._on_writable)

    def schedule_flush(self) -> None:
        self.loop.call_soon(self.client._flush_deferred)

    def _on_writable(self) -> None:
        if self.client._write_pending():
            self.loop.remove_writer(self.fd)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def stop(self) -> None:
        self.stop_reading()
        self.loop.remove_writer(self.fd)


class _TrioIo(_Io):
    def __init__(self, client: DlmClient) -> None:
        global _trio
        import trio

        _trio = self.trio = trio
        self.client = client
        self.woken = False
        self.writer: Any = None  # the write loop's task while it sleeps
        self.poller: busypoll.TrioPoller = busypoll.TrioPoller(
            trio, client._busy_poll, lambda: bool(client._calls))

    def future(self) -> _Waiter:
        return _TrioFuture()

    async def run(self, tasks: anyio.abc.TaskGroup) -> None:
        tasks.start_soon(self._read_loop)
        tasks.start_soon(self._write_loop)
        if self.poller.budget > 0:
            tasks.start_soon(self.poller.run)

    async def _read_loop(self) -> None:
        client, sock, wait_readable = self.client, self.client._sock, \
            self.trio.lowlevel.wait_readable
        try:
            while not client.closed:
                await wait_readable(sock)
                if not client._on_readable():
                    return
        except self.trio.ClosedResourceError:
            return

    async def _write_loop(self) -> None:
        client = self.client
        lowlevel = self.trio.lowlevel

        def abort(_: Any) -> Any:
            self.writer = None
            return lowlevel.Abort.SUCCEEDED

        try:
            while True:
                if not self.woken:
                    self.writer = lowlevel.current_task()
                    await lowlevel.wait_task_rescheduled(abort)
                self.woken = False
                client._flush_deferred()
                while client._blocked and not client._write_pending():
                    await lowlevel.wait_writable(client._sock)
        except self.trio.ClosedResourceError:
            return

    def _wake(self) -> None:
        self.woken = True
        writer, self.writer = self.writer, None
        if writer is not None:
            self.trio.lowlevel.reschedule(writer)

    def want_write(self) -> None:
        self._wake()

    def schedule_flush(self) -> None:
        self._wake()

    def stop(self) -> None:
        self.trio.lowlevel.notify_closing(self.client._sock)


class DlmClient:
    """One connection to the lock manager: one lock owner. Make it with `connect()`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._busy_poll = busypoll.budget_from_env()
        self._io: _Io = _TrioIo(self) if _on_trio() else _AsyncioIo(self)
        self._decoder = protocol.FrameDecoder()
        self._recv_buffer = bytearray(_RECV_SIZE)
        self._recv_view = memoryview(self._recv_buffer)
        self._calls: dict[int, _Waiter] = {}
        self._locks: dict[int, Lock] = {}
        self._out: list[bytes] = []  # not handed to the kernel yet
        self._blocked = False  # the kernel's buffer is full
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
        await self._call("join", domain=domain)

    async def leave(self, domain: str) -> None:
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
        self._flush_deferred()
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

    def _new_id(self) -> int:
        call_id = self._next_id
        self._next_id = (call_id + 1) & _U32 or 1
        return call_id

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        """A JSON request; its reply."""
        call_id = self._new_id()
        reply = await self._roundtrip(call_id, protocol.encode({"id": call_id, "op": op,
                                                                **args}))
        if not reply.get("ok"):
            raise DlmError(int(reply["errno"]), str(reply.get("error", "")))
        return dict(reply)

    async def _roundtrip(self, call_id: int, frame: bytes | None) -> Any:
        """Send a request frame (None: it is sent already) and wait for its reply (a dict, a
        lkid, or a DlmError)."""
        if self.closed:
            raise DlmError(errno.ENOTCONN, "not connected to the lock manager")
        waiter = self._calls[call_id] = self._io.future()
        try:
            if frame is not None:
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
        if self._blocked:
            return
        if defer:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._io.schedule_flush()
            return
        self._write_pending()
        if self.closed:
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")

    def _flush_deferred(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._blocked and not self.closed:
            self._write_pending()

    def _write_pending(self) -> bool:
        """Hand buffered requests to the kernel; True once none is left (False: the rest
        waits until the socket is writable)."""
        out = self._out
        if not out:
            self._blocked = False
            return True
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            out.clear()
            self._blocked = False
            self._lost(unexpected=True)
            return True
        if sent == len(data):
            out.clear()
            self._blocked = False
            return True
        out[:] = [data[sent:]]
        if not self._blocked:
            self._blocked = True
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

    def _on_readable(self) -> bool:
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
            except (protocol.ProtocolError, ValueError, KeyError, IndexError,
                    TypeError) as err:  # TypeError: a JSON reply whose id is a list
                return self._read_failed(err)
        return True

    def _read_failed(self, err: BaseException) -> bool:
        self._io.stop_reading()
        if not self.closed:
            log.warning("lock manager connection lost: %r", err)
            self._lost(unexpected=True)
        return False

    def _dispatch(self, body: bytes) -> None:
        kind = body[0]
        if kind == protocol.OK:
            _, call_id, lkid = protocol.OK_BODY.unpack_from(body)
            self._answered(call_id)
            waiter = self._calls.get(call_id)
            if waiter is not None:
                waiter.settle(lkid)
        elif kind == protocol.GRANTED:  # OK and GRANT in one: the lock was granted at once
            _, call_id, ref, lkid, mode, token, seq, bits = protocol.GRANTED_BODY.unpack_from(
                body)
            lock = self._locks.get(ref)
            if lock is not None:
                lvb = protocol.trailing_lvb(body, protocol.GRANTED_BODY.size,
                                            bits & protocol.GRANT_LVB)
                lock._granted(_MODES[mode], token, seq, bits, lvb)
            self._answered(call_id)
            waiter = self._calls.get(call_id)
            if waiter is not None:
                waiter.settle(lkid)
        elif kind == protocol.GRANT:
            _, ref, mode, token, seq, bits = protocol.GRANT_BODY.unpack_from(body)
            lock = self._locks.get(ref)
            if lock is not None:
                lvb = protocol.trailing_lvb(body, protocol.GRANT_BODY.size,
                                            bits & protocol.GRANT_LVB)
                lock._granted(_MODES[mode], token, seq, bits, lvb)
        elif kind == protocol.ERROR:
            _, call_id, err = protocol.ERROR_BODY.unpack_from(body)
            detail = body[protocol.ERROR_BODY.size:].decode(errors="replace")
            if call_id == 0:  # no request has id 0: the service refuses the connection
                self._refusal = DlmError(err, detail)
                return
            self._answered(call_id)
            waiter = self._calls.get(call_id)
            if waiter is not None:
                waiter.settle(DlmError(err, detail))
            else:
                log.warning("lock manager: a request not waited for failed: %s",
                            DlmError(err, detail))
        elif kind == protocol.CANCELLED or kind == protocol.BAST:
            _, ref, mode = protocol.EVENT_BODY.unpack_from(body)
            lock = self._locks.get(ref)
            if lock is None:
                return
            if kind == protocol.BAST:
                lock._bast(_MODES[mode])
            else:
                lock._cancelled(None if mode == protocol.NO_MODE else _MODES[mode])
        elif kind == protocol.JSON:
            message = protocol.decode_json(body)
            if isinstance(message.get("id"), int):
                self._answered(message["id"])
            waiter = self._calls.get(message.get("id", -1))
            if waiter is not None:
                waiter.settle(message)
        else:
            raise protocol.ProtocolError(f"unexpected message kind {kind}")

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


def _on_trio() -> bool:
    """Which loop runs us: asyncio has a running loop in this thread, trio has not."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


async def _connect_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if _on_trio():
            import trio

            try:
                sock.connect(path)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err), path) from None
        else:
            await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


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
    sock = await _connect_socket(protocol.socket_path(url))
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
        self._done: _Waiter | None = None
        self._outcome: str | None = None
        self._names: tuple[int, bytes] | None = None  # encoded for LOCK frames

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
        frame = protocol.encode_lvb_request(
            protocol.CONVERT_HEAD, protocol.CONVERT, call_id, self._ref, wanted, flags,
            lvb=self.lvb if writes else None)
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
        frame = protocol.encode_lvb_request(
            protocol.UNLOCK_HEAD, protocol.UNLOCK_QUIET if prompt else protocol.UNLOCK,
            call_id, ref, flags, lvb=lvb)
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
        await client._roundtrip(call_id, protocol.CANCEL_FRAME.pack(
            protocol.CANCEL_BODY.size, protocol.CANCEL, call_id, ref))

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
        if self._outcome == "lost":
            raise DlmError(errno.ENOTCONN, "connection to the lock manager lost")
        return self._outcome == "granted"

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

    def _granted(self, mode: Mode, token: int, seq: int, bits: int, lvb: bytes | None
                 ) -> None:
        self.mode = mode
        self.token = token
        if lvb is not None:
            self.lvb = lvb
            self._lvb_dirty = False
        self.lvb_valid = bool(bits & protocol.GRANT_VALID)
        self.lvb_seq = seq
        self.demoted = bool(bits & protocol.GRANT_DEMOTED)
        self.blocking = None
        self._outcome = "granted"
        if self._done is not None:
            self._done.settle(True)

    def _cancelled(self, mode: Mode | None) -> None:
        if mode is None:
            self._forget()
        else:
            self.mode = mode
        self._outcome = "cancelled"
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
        self._outcome = "lost"
        if self._done is not None:
            self._done.settle(None)

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
