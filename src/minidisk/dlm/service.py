"""The embedded lock manager: one `Engine` served on a unix socket, on asyncio.

The wire format is documented in `minidisk.dlm.protocol`. Each connection is one lock owner;
when it drops (the process exited, was killed, or closed the socket) its locks are released and
the waiters behind them granted, in queue order, in the same event-loop step.

Embedding (what `minidisk serve` does to host the DLM next to its NBD server)::

    from minidisk.dlm.service import start_dlm_service

    dlm = await start_dlm_service("unix:///run/minidisk/dlm.sock")   # or a bare path
    ...                                                              # serve NBD meanwhile
    await dlm.close()

On its own: `minidisk dlm serve URL`, which is `run_dlm_service(url)`.

The engine is synchronous and does no I/O, so every request is handled to completion inside
`data_received`; replies and events are queued per connection and written once per wakeup.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any, cast

from minidisk import busypoll
from minidisk.dlm import protocol
from minidisk.dlm.engine import DlmError, Engine
from minidisk.dlm.figures import DlmFigures
from minidisk.dlm.limits import Limits
from minidisk.dlm.listing import Cursor
from minidisk.dlm.messages import (
    CancelRequest,
    ConvertRequest,
    Drop,
    Hello,
    Join,
    Leave,
    LockRequest,
    Purge,
    Request,
    StatusRequest,
    UnlockRequest,
)
from minidisk.dlm.state import Cancelled, Event, Granted
from minidisk.unixsocket import remove_stale_socket

log = logging.getLogger("minidisk.dlm")

# A client that stops reading while events pile up for it is cut off (and loses its locks)
# rather than letting the service's memory grow without bound.
MAX_WRITE_BUFFER = 8 << 20

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_DRAIN_SIZE = 1 << 16
# How long a refused connection stays half-open (its refusal sent, then end of stream) for the
# client to read why before it is closed.
REFUSED_LINGER_S = 1.0
# FIONREAD's answer, for `_Connection.drain` (one loop thread: one buffer for all; asking
# costs a third of the failed read it replaces).
_QUEUED_BYTES = bytearray(4)
_QUEUED = memoryview(_QUEUED_BYTES).cast("i")


class _Connection(asyncio.Protocol):
    """One client connection, which is also one lock owner in the engine."""

    def __init__(self, service: DlmService) -> None:
        self._service = service
        self.decoder = protocol.FrameDecoder(protocol.MAX_REQUEST)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self.refs: dict[int, int] = {}  # the client's lock number -> engine lock id
        self.pid = 0
        self.name = ""
        self.granted_reply = False  # answer a LOCK granted at once with one GRANTED frame
        self.prompt_unlock = False  # what it has sent is handled before others' later requests
        self.closing = False  # hung up: nothing it sent is handled any more
        self._fd = -1
        self._linger: asyncio.TimerHandle | None = None

    def __str__(self) -> str:
        who = self.name or "client"
        return f"{who}[{self.pid}]"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            self.pid = _PEERCRED.unpack(creds)[0]
        with contextlib.suppress(OSError, AttributeError):
            self._fd = sock.fileno()
        service = self._service
        if len(service.connections) >= service.limits.clients:
            log.warning("%s: refused, %d clients already", self, len(service.connections))
            # Request id 0 is never used by a client: this names the refusal to it.
            self._transport.write(protocol.encode_error(
                0, errno.EUSERS, f"the lock manager serves {len(service.connections)} "
                                 "clients, the most it allows"))
            self.closing = True
            # Closed now, with the client's hello unread, the client's write of it could fail
            # (EPIPE) before it reads why: end the stream instead, and close when the client
            # hangs up or after REFUSED_LINGER_S, whichever comes first.
            self._transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(
                REFUSED_LINGER_S, self._transport.close)
            return
        service.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.closing:
            self._service.received(self, data)

    def drain(self) -> None:
        """Read and handle, now, what this connection has sent that is still in its socket's
        buffer -- exactly what is there at this moment, which is everything sent before the
        request that made the service look, and no more: a client that keeps writing cannot
        keep the service here. Reading under the transport's feet is safe: its own next read
        finds the rest or nothing (EAGAIN); an end of stream or an error is left for it."""
        fd = self._fd
        try:
            fcntl.ioctl(fd, termios.FIONREAD, _QUEUED_BYTES)
        except OSError:
            return
        left = _QUEUED[0]
        service = self._service
        while left > 0 and not self.closing:
            try:
                data = os.read(fd, min(left, _DRAIN_SIZE))
            except OSError:
                return
            if not data:
                return
            left -= len(data)
            service.take(self, data)
            if left:
                self.flush()  # its replies leave (or it is cut off) before it may send more

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self._transport = None
        self.closing = True
        self._service.connection_gone(self)

    def send(self, message: dict[str, Any]) -> None:
        self.send_frame(protocol.encode(message))

    def send_frame(self, frame: bytes) -> None:
        if not self.closing:
            if not self._out:
                self._service.dirty.append(self)
            self._out.append(frame)

    def flush(self) -> None:
        transport = self._transport
        if transport is None or self.closing or not self._out:
            self._out.clear()
            return
        transport.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
        self._out.clear()
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._service.hang_up(self, "not reading its events")

    def abort(self) -> None:
        """Drop the connection at once; nothing it sent afterwards is handled, nothing more
        is sent to it. Its locks go when the transport reports it lost."""
        self.closing = True
        self._out.clear()
        if self._transport is not None:
            self._transport.abort()


def _event_frame(event: Event, ref: int) -> bytes:
    if isinstance(event, Granted):
        return protocol.encode_grant(ref, event.mode, event.token, event.lvb_seq,
                                     event.lvb_valid, event.demoted, event.lvb)
    if isinstance(event, Cancelled):
        return protocol.encode_cancelled(ref, event.mode)
    return protocol.encode_bast(ref, event.mode)


class DlmService:
    """A lock manager serving one engine on a unix socket. Start it with
    `start_dlm_service()`; stop it with `close()`."""

    def __init__(self, engine: Engine | None = None, *, busy_poll: float | None = None,
                 limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        # Tokens start at the wall clock in microseconds, so they keep increasing across a
        # restart of the service (as long as it granted fewer than a million locks a second).
        self.engine = engine or Engine(first_token=time.time_ns() // 1000,
                                       max_locks=self.limits.locks,
                                       max_resources=self.limits.resources)
        self.connections: set[_Connection] = set()
        self.dirty: list[_Connection] = []
        # Connections with the prompt-unlock feature: before any other connection's data is
        # handled, what they have already sent is (see `drain_prompt`).
        self.prompt: list[_Connection] = []
        self.path = ""
        self._server: asyncio.AbstractServer | None = None
        self._routes: dict[int, tuple[_Connection, int]] = {}  # engine lock id -> (conn, ref)
        self._closed = asyncio.Event()
        self.busy_poll = busypoll.budget_from_env() if busy_poll is None else busy_poll
        self.poller: busypoll.AsyncioPoller | None = None
        self.figures = DlmFigures()  # grants, waits, wait times (figures.py)

    async def start(self, path: str) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        remove_stale_socket(path)
        loop = asyncio.get_running_loop()
        if self.busy_poll > 0:
            self.poller = busypoll.AsyncioPoller(loop, self.busy_poll)
        # A backlog as deep as the client limit: a burst of connects within it all land.
        self._server = await loop.create_unix_server(lambda: _Connection(self), path,
                                                     backlog=self.limits.clients)
        self.path = path
        log.info("lock manager listening on %s", path)

    async def close(self) -> None:
        """Stop listening, drop every connection (releasing its locks), remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for conn in list(self.connections):
            conn.abort()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- requests ---------------------------------------------------------------------------

    def received(self, conn: _Connection, data: bytes) -> None:
        """What one connection's wake-up read: first what prompt-unlock connections have
        already sent (see `drain_prompt`), then this, then every reply and event leaves."""
        if self.prompt:
            self.drain_prompt(conn)
        self.take(conn, data)
        self.flush()
        if self.poller is not None:
            # This client's next request (or another's) usually follows within tens of
            # microseconds: stay awake for it (see busypoll).
            self.poller.poke()

    def take(self, conn: _Connection, data: bytes) -> None:
        """Decode and handle bytes `conn` sent. Every connection's input goes through here,
        whichever connection's wake-up read it (a prompt-unlock drain reads other sockets),
        so whatever goes wrong while handling it is `conn`'s, and hangs up `conn` alone."""
        if conn.closing:
            return
        try:
            for body in conn.decoder.feed(data):
                self.handle_body(conn, body)
        except protocol.ProtocolError as err:
            self.hang_up(conn, str(err))
        except Exception:  # a bug, but still one this sender's bytes hit: it alone pays
            log.exception("%s: handling its request failed", conn)
            self.hang_up(conn, "internal error")

    def hang_up(self, conn: _Connection, why: str) -> None:
        log.warning("%s: %s; closing", conn, why)
        if conn in self.prompt:
            self.prompt.remove(conn)
        conn.abort()

    def handle_body(self, conn: _Connection, body: bytes) -> None:
        """One request frame (its body, kind byte first): handled, answered, events queued."""
        try:
            request = protocol.decode_request(body)
        except protocol.RequestError as err:
            if body[0] == protocol.JSON:
                conn.send({"id": err.call_id, "ok": False, "errno": errno.EINVAL,
                           "error": err.detail})
            else:
                conn.send_frame(protocol.encode_error(err.call_id, errno.EINVAL, err.detail))
            return
        events: list[Event]
        try:
            if type(request) is LockRequest:
                self._admit_lock(conn, request.ref, request.domain)
                lkid, events = self.engine.request(conn, request.domain, request.name,
                                                   request.mode, request.flags)
                conn.refs[request.ref] = lkid
                self._routes[lkid] = (conn, request.ref)
                first = events[0] if events else None
                if type(first) is Granted and first.lkid == lkid:
                    self.figures.granted_at_once += 1
                else:
                    self.figures.queued(lkid)
                if conn.granted_reply and type(first) is Granted and first.lkid == lkid:
                    # Granted at once: the grant is the reply (its own event is always first).
                    conn.send_frame(protocol.encode_granted(
                        request.call_id, request.ref, lkid, first.mode, first.token,
                        first.lvb_seq, first.lvb_valid, first.demoted, first.lvb))
                    del events[0]
                else:
                    conn.send_frame(protocol.encode_ok(request.call_id, lkid))
            elif type(request) is UnlockRequest:
                events = self.engine.unlock(self._lkid_of(conn, request.ref), request.lvb,
                                            request.flags)
                self._forget(conn, request.ref)
                if not request.quiet:
                    conn.send_frame(protocol.encode_ok(request.call_id))
            elif type(request) is ConvertRequest:
                events = self.engine.convert(self._lkid_of(conn, request.ref), request.mode,
                                             request.flags, request.lvb)
                conn.send_frame(protocol.encode_ok(request.call_id))
            elif type(request) is CancelRequest:
                events = self.engine.cancel(self._lkid_of(conn, request.ref))
                conn.send_frame(protocol.encode_ok(request.call_id))
            else:
                self.handle(conn, request)
                return
        except DlmError as err:
            events = err.events
            self.figures.refused += 1
            conn.send_frame(protocol.encode_error(request.call_id, err.errno or errno.EIO,
                                                  err.detail))
        if events:
            self.deliver(events)

    def handle(self, conn: _Connection, request: Request) -> None:
        """A JSON request: answered in JSON."""
        try:
            result, events = _HANDLERS[type(request)](self, conn, request)
            reply: dict[str, Any] = {"id": request.call_id, "ok": True, **result}
        except DlmError as err:
            events = err.events
            reply = {"id": request.call_id, "ok": False, "errno": err.errno,
                     "error": err.detail}
        conn.send(reply)
        self.deliver(events)

    def deliver(self, events: list[Event]) -> None:
        routes = self._routes
        figures = self.figures
        for event in events:
            route = routes.get(event.lkid)
            if route is None:
                continue
            if type(event) is Granted:
                figures.granted(event.lkid)
            conn, ref = route
            conn.send_frame(_event_frame(event, ref))
            if type(event) is Cancelled and event.mode is None:
                self._forget(conn, ref)

    def flush(self) -> None:
        for conn in self.dirty:
            conn.flush()
        self.dirty.clear()

    def drain_prompt(self, reader: _Connection) -> None:
        """Handle what every prompt-unlock connection has already sent. Called before the
        data of any other connection: a request read now was sent after whatever those
        connections' sockets hold, so it must see it handled. This is what lets such a
        client count an unlock as done once it is in the socket (dlmfs's close returns
        then) instead of waiting for the reply: nobody can ask anything that overtakes it."""
        for conn in tuple(self.prompt):  # what a drain handles may turn the feature off
            if conn is not reader:
                conn.drain()

    def connection_gone(self, conn: _Connection) -> None:
        if conn in self.prompt:
            self.prompt.remove(conn)
        self.connections.discard(conn)
        for lkid in conn.refs.values():
            self._routes.pop(lkid, None)
            self.figures.forget(lkid)
        conn.refs.clear()
        self.deliver(self.engine.owner_gone(conn))
        self.flush()

    def _admit_lock(self, conn: _Connection, ref: int, domain: str) -> None:
        """May `conn` ask for one more lock, as `ref`, in `domain`?"""
        if ref in conn.refs:
            raise DlmError(errno.EINVAL, f"ref {ref} is already in use")
        if len(conn.refs) >= self.limits.locks_per_client:
            raise DlmError(errno.ENOLCK, f"this client has {len(conn.refs)} locks, the most "
                                         "the lock manager allows one")
        self._admit_domain(conn, domain)

    def _admit_domain(self, conn: _Connection, domain: str) -> None:
        """May `conn` be (or become) a member of `domain`?"""
        joined = self.engine.memberships(conn)
        if len(joined) >= self.limits.domains_per_client and domain not in joined:
            raise DlmError(errno.EDQUOT, f"this client is in {len(joined)} domains, the most "
                                         "the lock manager allows one")

    def _forget(self, conn: _Connection, ref: int) -> None:
        lkid = conn.refs.pop(ref, None)
        if lkid is not None:
            self._routes.pop(lkid, None)
            self.figures.forget(lkid)

    def _lkid_of(self, conn: _Connection, ref: int) -> int:
        try:
            return conn.refs[ref]
        except KeyError:
            raise DlmError(errno.ENOENT, f"no lock with ref {ref}") from None

    # One method per JSON request: (connection, request) -> (result fields, events).

    def _op_hello(self, conn: _Connection, msg: Hello) -> _Result:
        conn.name = msg.name[:100]
        asked = msg.features
        if asked is not None:  # a hello without the field (a sync) changes nothing
            conn.granted_reply = protocol.FEATURE_GRANTED_REPLY in asked
            # Each prompt-unlock connection costs every other connection's wake-up a look
            # at its socket: past the limit the feature is not granted (the client then
            # waits for its unlocks' replies instead).
            prompt = (protocol.FEATURE_PROMPT_UNLOCK in asked and conn._fd >= 0
                      and (conn.prompt_unlock
                           or len(self.prompt) < self.limits.prompt_clients))
            if prompt and not conn.prompt_unlock:
                self.prompt.append(conn)
            elif conn.prompt_unlock and not prompt:
                self.prompt.remove(conn)
            conn.prompt_unlock = prompt
        features = [name for name, on in ((protocol.FEATURE_GRANTED_REPLY, conn.granted_reply),
                                          (protocol.FEATURE_PROMPT_UNLOCK, conn.prompt_unlock))
                    if on]
        return {"server": "minidisk-dlm", "version": protocol.VERSION, "pid": os.getpid(),
                "features": features}, []

    def _op_join(self, conn: _Connection, msg: Join) -> _Result:
        self._admit_domain(conn, msg.domain)
        self.engine.join(conn, msg.domain)
        return {}, []

    def _op_leave(self, conn: _Connection, msg: Leave) -> _Result:
        self.engine.leave(conn, msg.domain)
        return {}, []

    def _op_drop(self, conn: _Connection, msg: Drop) -> _Result:
        self.engine.drop(msg.domain, msg.name)
        return {}, []

    def _op_status(self, conn: _Connection, msg: StatusRequest) -> _Result:
        """One page of `Engine.listing`, at most `STATUS_PAGE` bytes of JSON: the first (no
        "after") with the clients, each with "next", the cursor to ask the following one
        with as "after" (null on the last). A domain or resource that goes on from the
        previous page comes again with "continued": true and only the rest of its pieces."""
        start = msg.after
        page: dict[str, Any] = {"domains": []}
        size = 0
        if start is None:
            page["clients"] = [{"owner": str(c), "pid": c.pid, "locks": len(c.refs)}
                               for c in sorted(self.connections, key=str)]
            size = len(protocol.encode(page))
        domains: list[dict[str, Any]] = page["domains"]
        reached: Cursor | None = None  # the position after the last piece on this page
        for position, kind, piece in self.engine.listing(start):
            cost = len(json.dumps(piece, separators=(",", ":"))) + _PIECE_OVERHEAD
            if reached is not None and size + cost > STATUS_PAGE:
                return {**page, "next": list(reached)}, []
            size += cost
            if kind == "domain":
                domains.append({**piece, "resources": []})
            else:
                if not domains or domains[-1]["name"] != position[0]:
                    domains.append({"name": position[0], "continued": True, "resources": []})
                resources = domains[-1]["resources"]
                if kind == "resource":
                    resources.append({**piece, "granted": [], "converting": [], "waiting": []})
                else:
                    if not resources or resources[-1]["name"] != position[1]:
                        resources.append({"name": position[1], "continued": True,
                                          "granted": [], "converting": [], "waiting": []})
                    resources[-1][kind].append(piece)
            reached = position
        return {**page, "next": None}, []

    def _op_purge(self, conn: _Connection, msg: Purge) -> _Result:
        pid = msg.pid
        count, events = self.engine.purge(
            msg.domain,
            None if pid is None else (lambda owner: getattr(owner, "pid", None) == pid))
        return {"purged": count}, events


_Result = tuple[dict[str, Any], list[Event]]
_Handler = Callable[[DlmService, _Connection, Any], _Result]
_HANDLERS: dict[type, _Handler] = {
    Hello: DlmService._op_hello, Join: DlmService._op_join, Leave: DlmService._op_leave,
    Drop: DlmService._op_drop, StatusRequest: DlmService._op_status,
    Purge: DlmService._op_purge,
}

# A status page's budget: a piece costs its JSON and `_PIECE_OVERHEAD` (a comma, and the
# empty queues of a resource); the 64 KiB left of the frame cover the rest of the reply and
# the at most two "continued" containers a page opens (names of 64 bytes, JSON-escaped).
STATUS_PAGE = protocol.MAX_FRAME - (64 << 10)
_PIECE_OVERHEAD = 48


async def start_dlm_service(url: str | None = None, *, busy_poll: float | None = None,
                            limits: Limits | None = None) -> DlmService:
    """Start a lock manager on the running asyncio loop; returns once it is listening.

    `url` is `unix:///abs/path`, `unix://relative/path` or a path; None means $MINIDISK_DLM or
    `protocol.DEFAULT_URL`. Call `await service.close()` to stop it.
    """
    service = DlmService(busy_poll=busy_poll, limits=limits)
    await service.start(protocol.socket_path(url))
    return service


def run_dlm_service(url: str | None = None, *, ready: Callable[[str], None] | None = None,
                    busy_poll: float | None = None, limits: Limits | None = None) -> None:
    """Serve until SIGINT or SIGTERM (`minidisk dlm serve`). `ready` is called with the
    socket's path once it listens (the CLI prints it, or tells the parent it detached from)."""

    async def main() -> None:
        service = await start_dlm_service(url, busy_poll=busy_poll, limits=limits)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(service.close()))
        if ready is not None:
            ready(service.path)
        await service.wait_closed()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable without
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
