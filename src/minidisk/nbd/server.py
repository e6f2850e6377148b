"""The NBD server: listeners, connections (connection.py) and what they share.

The server owns what is common to its connections: the export source and policy, TLS, the
control handler, the connection limit, the payload budget (and trimming the heap after a
burst), and shutdown. Listening is listen.py's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from typing import Any

from minidisk import busypoll
from minidisk.nbd import protocol as p
from minidisk.nbd.budget import PayloadBudget
from minidisk.nbd.connection import Connection
from minidisk.nbd.exports import (
    ControlPolicy,
    DictExports,
    ExportPolicy,
    ExportSource,
    Identity,
    allow_all,
    local_admins,
)
from minidisk.nbd.listen import Listeners, raise_fd_limit
from minidisk.nbd.malloc_tuning import TRIM_THRESHOLD, give_back, keep_buffers_on_heap
from minidisk.nbd.negotiation import ControlHandler, TLSMode
from minidisk.nbd.stats import ExportStats

log = logging.getLogger(__name__)

DRAIN_BUFFER = 64 * 1024  # where refused WRITE payloads are read and dropped (shared)
CONNECTION_BUDGET = 64 * 1024 * 1024  # payload bytes one connection may hold (nbdkit's
# largest request, so that two 32 MiB requests may be in flight)
SERVER_BUDGET = 512 * 1024 * 1024  # payload bytes all connections together may hold
TRIM_DELAY = 1.0  # seconds without payload in memory before a burst's heap is trimmed
FD_RESERVE = 256  # open files beyond one per connection: exports, logs, the thread pool


class NBDServer:
    def __init__(
        self,
        exports: ExportSource,
        *,
        read_only: bool = False,
        tls_mode: TLSMode = TLSMode.OFF,
        tls_context: ssl.SSLContext | None = None,
        policy: ExportPolicy = allow_all,
        control: ControlHandler | None = None,
        control_policy: ControlPolicy = local_admins,
        busy_poll: float = 0.0,
        max_connections: int = 1024,
        handshake_timeout: float = 10.0,
        peer_timeout: int = 120,
        payload_budget: int = SERVER_BUDGET,
    ) -> None:
        if tls_mode is not TLSMode.OFF and tls_context is None:
            raise ValueError("TLS needs certificates (--tls-certificates DIR)")
        self.exports = exports
        self.read_only = read_only
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self.policy = policy
        self.control = control
        self.control_policy = control_policy
        self.connections: set[Connection] = set()
        self.export_stats = ExportStats()  # per-export request figures (stats.py)
        # Connections in every phase count; one more is closed before the greeting (as
        # nbdkit's limit filter and nbd-server's maxconnections refuse), not left waiting
        # in the backlog, which is as long as the limit so that a burst is never refused.
        self.max_connections = max_connections
        self.at_limit = False  # logged once per episode, not per refused client
        self.handshake_timeout = handshake_timeout
        self.peer_timeout = peer_timeout
        self.budget = PayloadBudget(payload_budget, self._budget_idle)
        self.connection_budget = min(CONNECTION_BUDGET, payload_budget)
        self.drain_view = memoryview(bytearray(DRAIN_BUFFER))
        self.trim: asyncio.TimerHandle | None = None
        # Bounded busy-polling after requests and replies (see minidisk.busypoll): off
        # unless asked for, as it spends CPU to save the wake-up of an idle vCPU.
        self.busy_poll = busy_poll
        self.poller: busypoll.AsyncioPoller | None = None
        self.listeners = Listeners(lambda kind: Connection(self, kind), max_connections)
        self.shutting_down = False

    def admit_connection(self) -> bool:
        if len(self.connections) < self.max_connections:
            self.at_limit = False
            return True
        if not self.at_limit:
            self.at_limit = True
            log.warning("connection limit (%d) reached: closing new connections",
                        self.max_connections)
        return False

    def _budget_idle(self, peak: int) -> None:
        """No payload in memory any more: after a burst larger than glibc trims by itself,
        give the freed heap back once the server stays idle a moment (trimming between
        requests would cost the page faults malloc_tuning avoids)."""
        if peak >= TRIM_THRESHOLD and self.trim is None:
            self.trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self.trim = None
        if self.budget.used == 0:
            give_back()
        else:  # busy again: trim after this burst instead
            self.budget.peak = max(self.budget.peak, TRIM_THRESHOLD)

    def offers_control(self, identity: Identity) -> bool:
        """Whether this connection is offered the control option (asked again once TLS
        has proved a subject)."""
        return self.control is not None and self.control_policy(identity)

    def connection_closed(self, identity: Identity) -> asyncio.Event | None:
        """The event set when the connection whose identity is `identity` (that very object,
        as a control handler receives it) closes; None if no such connection is open."""
        for conn in self.connections:
            if conn.identity is identity:
                return conn.closed
        return None

    def hang_up(self, wanted: Callable[[Identity, str, bool], bool]) -> list[asyncio.Event]:
        """Finish in-flight requests and close every data connection for which
        `wanted(identity, export name, writable)` is true (e.g. a principal whose link
        ended); returns their `closed` events, so that the caller can wait until no request
        of theirs is left."""
        closing = []
        for conn in list(self.connections):
            if conn.session is not None and conn.export is not None \
                    and conn.identity is not None \
                    and wanted(conn.identity, conn.export.name,
                               not conn.session.tflags & p.TFLAG_READ_ONLY):
                conn.begin_shutdown()
                closing.append(conn.closed)
        return closing

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every export's request figures so far: its closed connections' and its open
        ones' (stats.py)."""
        return self.export_stats.snapshot([(conn.export.name, conn.stats)
                                           for conn in self.connections
                                           if conn.export is not None])

    @property
    def unix_paths(self) -> list[str]:
        """The unix socket paths listened on (the daemon opens them to local users)."""
        return self.listeners.unix_paths

    async def start(self, urls: list[str]) -> None:
        """Listen on the sockets systemd passed us, or else on every URL."""
        wanted = self.max_connections + FD_RESERVE
        if raise_fd_limit(wanted) < wanted:
            log.warning("open file limit is below %d: connections may fail before the "
                        "limit of %d", wanted, self.max_connections)
        await self.listeners.start(urls)

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or the one stdin/stdout connection ends), then shut down."""
        waiters = [asyncio.ensure_future(stop.wait())]
        if self.listeners.stdio_closed is not None:
            waiters.append(asyncio.ensure_future(self.listeners.stdio_closed.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        await self.shutdown()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish, fail the rest with ESHUTDOWN."""
        self.shutting_down = True
        self.listeners.stop()
        for conn in list(self.connections):
            conn.begin_shutdown()
        waits = [conn.closed.wait() for conn in list(self.connections)]
        if waits:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(w) for w in waits], timeout=timeout)
            if pending:
                log.warning("shutdown: %d connection(s) still busy after %g s; closing them",
                            len(pending), timeout)
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            for fut in pending:
                fut.cancel()
        self.listeners.remove_paths()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (it is a dependency); stdlib asyncio otherwise."""
    keep_buffers_on_heap()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve_until_signalled(server: NBDServer, urls: list[str]) -> None:
    """Listen on `urls` (or inherited sockets) and serve until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(urls)
    await server.serve_until(stop)


def serve_object(obj: Any, url: str, name: str = "disk", read_only: bool = False) -> None:
    """Serve one Python object (see minidisk.device.adapter) at `url` until Ctrl-C."""
    from minidisk.device.adapter import from_object

    device = from_object(obj, read_only=read_only)
    server = NBDServer(DictExports({name: device}), read_only=read_only)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve_until_signalled(server, [url]))
    finally:
        loop.run_until_complete(device.close())
        loop.close()
