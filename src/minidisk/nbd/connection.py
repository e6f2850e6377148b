"""One NBD connection: an asyncio `BufferedProtocol` over the sans-I/O protocol modules.

The handshake is handshake_driver.py's (its decisions negotiation.py's), the request checks
checks.py's, the reply bytes protocol.py's and their way out reply_writer.py's; here
requests are read and dispatched and bounds kept (research/python-stack.md §2): all
request headers of a wakeup parsed from one receive buffer, WRITE payloads received
straight into their own buffer (large ones reused from the connection's pool, buffers.py),
one coroutine per request stepped inline until it waits (inline.py), and back-pressure
instead of errors: reading pauses under write back-pressure, at MAX_INFLIGHT requests, or
while the next payload does not fit the connection's or the server's budget (budget.py).
Requests are checked before their buffers are allocated; a refused WRITE's payload is
read into a shared buffer and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from time import monotonic_ns
from typing import TYPE_CHECKING

from minidisk import busypoll
from minidisk.device.api import MAX_REQUEST, BlockDevice
from minidisk.nbd import protocol as p
from minidisk.nbd.budget import fits, payload_charge
from minidisk.nbd.buffers import MIN_POOLED, BufferPool, loop_limit
from minidisk.nbd.checks import MAX_DRAIN, MAX_PAYLOAD, check_request
from minidisk.nbd.exports import Identity, OpenedExport
from minidisk.nbd.handshake_driver import HandshakeDriver
from minidisk.nbd.inline import run_inline
from minidisk.nbd.listen import drop_dead_peers, peer_identity
from minidisk.nbd.negotiation import Negotiation, TransmissionTerms
from minidisk.nbd.reply_writer import ReplyWriter, tune_send_buffer
from minidisk.nbd.stats import LATENCY_SAMPLE_MASK, RequestStats
from minidisk.nbd.transport import Transport

if TYPE_CHECKING:
    from minidisk.nbd.server import NBDServer

log = logging.getLogger(__name__)

RX_BUFFER = 256 * 1024  # in transmission: many request headers per wakeup
HANDSHAKE_RX = 4096  # before it: options are small, and idle clients cost little
# Requests in flight per connection before parsing and reading pause: each costs a few KiB
# (coroutine, task, a thread pool work item). nbdkit runs 16 per connection, qemu-nbd 16;
# nbdcopy sends 64, the benchmarks 32.
MAX_INFLIGHT = 128
# Reply bytes one parsing pass may queue before it writes them out and, if the client is
# not reading, stops. Without it one 256 KiB receive buffer of 32 MiB READ headers made
# the server queue gigabytes of replies for a client that never reads them.
MAX_QUEUED_OUT = 16 * 1024 * 1024


def plain_io(device: BlockDevice, writable: bool, cmd: int, flags: int, offset: int,
             length: int) -> bool:
    """Whether this is a READ or WRITE without flags that check_request accepts: the
    common request, checked here in a few operations (check_request was a tenth of the
    server's CPU on 4 KiB writes). Anything else goes to check_request, which decides, so
    this may say yes only where it would (tests/nbd/test_plain_io.py)."""
    if flags or not (cmd == p.CMD_READ or (cmd == p.CMD_WRITE and writable)):
        return False
    bs = device.block_size
    return (offset + length <= device.size
            and not (offset | length) & (bs.minimum - 1)
            and length <= (bs.maximum if bs.maximum < MAX_REQUEST else MAX_PAYLOAD))


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NBDServer, transport_kind: Transport) -> None:
        self.server = server
        self.kind = transport_kind
        self.loop = asyncio.get_running_loop()
        if server.busy_poll > 0 and server.poller is None:  # on the serving loop, once
            server.poller = busypoll.AsyncioPoller(self.loop, server.busy_poll)
        self.pool = BufferPool(loop_limit(self.loop))
        self.replies = ReplyWriter(self.loop, self.pool, self._give, self._watch_progress)
        self.replies.poller = server.poller
        self.transport: asyncio.Transport | None = None
        self.handshake: HandshakeDriver | None = None  # from connection_made on
        self.session: TransmissionTerms | None = None
        self.export: OpenedExport | None = None
        self.device: BlockDevice | None = None
        self.rx = bytearray(HANDSHAKE_RX)
        self.rx_view = memoryview(self.rx)
        self.rx_start = self.rx_end = 0
        self.drain = 0  # bytes of a refused WRITE's payload still to be read and dropped
        # A WRITE whose payload is still arriving: (payload, received, request fields)
        self.payload: bytearray | None = None
        self.payload_view: memoryview | None = None
        self.payload_pos = 0
        self.payload_request: tuple[int, int, int, int] = (0, 0, 0, 0)
        # Payload budget bytes (see minidisk.nbd.budget) this connection holds: in flight,
        # and replies not yet taken by the transport (the reply writer's unsent and held).
        self.charged = 0
        self.budget_blocked = False  # the next request waits for budget
        self.inflight = 0
        self.reading_paused = False
        self.writable = False  # the export takes writes (the READ/WRITE fast check)
        self.parse_deferred = False  # requests left in rx until the client reads replies
        self.disconnecting = False
        self.shutting_down = False
        self.closed = asyncio.Event()
        self.since = time.time()  # when it was accepted (`minidisk clients`)
        self.stats = RequestStats()  # this connection's requests (stats.py)
        # Its lists, one attribute lookup away on the hot path.
        self.stat_requests, self.stat_bytes = self.stats.requests, self.stats.bytes
        self.stat_latency, self.stat_latency_ns = self.stats.latency, self.stats.latency_ns
        self.tasks: set[asyncio.Task[None]] = set()
        # Until transmission (or a control command) a client must hurry: see connection_made.
        self.handshake_deadline: asyncio.TimerHandle | None = None
        # A client holding budget (a WRITE payload half sent, replies it does not read) must
        # make progress: see _watch_progress.
        self.progress = 0.0  # loop time of its last progress
        self.backlog = 0  # the transport's write buffer size when last looked at
        self.stall_check: asyncio.TimerHandle | None = None

    @property
    def identity(self) -> Identity | None:
        """The peer as proven so far (updated when TLS starts)."""
        return self.handshake.identity if self.handshake is not None else None

    # -- connection lifecycle --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.replies.transport = self.transport
        srv = self.server
        if not srv.admit_connection():
            transport.close()  # before the greeting: the client sees a clean EOF
            return
        sock = transport.get_extra_info("socket")
        identity = peer_identity(sock, self.kind)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if srv.peer_timeout:
                drop_dead_peers(sock, srv.peer_timeout)
        if srv.handshake_timeout:
            self.handshake_deadline = self.loop.call_later(
                srv.handshake_timeout, self.abort,
                f"no handshake within {srv.handshake_timeout:g} s")
        negotiation = Negotiation(
            srv.exports, identity, srv.policy, srv.tls_mode, srv.read_only,
            control_allowed=srv.offers_control(identity),
        )
        negotiation.shutting_down = srv.shutting_down
        self.handshake = HandshakeDriver(self, negotiation)
        srv.connections.add(self)
        log.debug("connection from %s", identity)
        self.replies.send(p.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.handshake_done()
        if self.stall_check is not None:
            self.stall_check.cancel()
        if self.payload is not None:  # a WRITE whose payload never came in full
            size = len(self.payload)
            self.payload = self.payload_view = None
            self._give(size)
        self.server.budget.leave(self)
        unsent = self.replies.discard()  # in-flight requests give theirs back when they end
        if unsent:
            self._give(unsent)
        self.pool.clear()
        self.server.connections.discard(self)
        if self.export is not None:
            self.server.export_stats.closed_connection(self.export.name, self.stats)
            self.export.close()
        self.closed.set()
        if exc is not None:
            log.debug("connection lost: %s", exc)

    def hang_up(self) -> None:
        """Close after the replies queued so far."""
        if self.transport is not None:
            self.replies.flush()
            self.transport.close()

    def handshake_done(self) -> None:
        """No handshake deadline any more: transmission or a control command began."""
        if self.handshake_deadline is not None:
            self.handshake_deadline.cancel()
            self.handshake_deadline = None

    def abort(self, reason: str) -> None:
        log.warning("dropping connection: %s", reason)
        if self.transport is not None:
            self.transport.abort()

    # -- write back-pressure (the replies themselves: reply_writer.py) --

    def pause_writing(self) -> None:
        self.replies.pause()
        self.update_reading()

    def resume_writing(self) -> None:
        self.progress = self.loop.time()
        self.replies.resume()
        if self.parse_deferred:  # parse what is left before reading more
            self.loop.call_soon(self._continue_parsing)
        if self.handshake is not None:
            self.handshake.writable()
        self.update_reading()

    def budget_freed(self) -> None:
        if self.budget_blocked:
            self.loop.call_soon(self._continue_parsing)

    def _continue_parsing(self) -> None:
        """Parse the requests left in rx when the client fell behind or the budget ran out."""
        if not (self.parse_deferred or self.budget_blocked):
            return
        self.parse_deferred = self.budget_blocked = False
        if self.transport is None or self.session is None:
            return
        try:
            self._transmission_input()
        except p.ProtocolError as e:
            log.warning("dropping connection: %s", e)
            self.disconnecting = True
            self.hang_up()
            return
        if not self.budget_blocked:
            # Not waiting for the server's budget (any more): a place kept in its queue
            # would hold up everyone behind it, e.g. while our client does not read.
            self.server.budget.leave(self)
        self.update_reading()

    # -- payload budget --

    def _take(self, size: int) -> bool:
        """Take `size` payload bytes, or stop parsing until they are available."""
        srv = self.server
        if fits(self.charged, size, srv.connection_budget) and srv.budget.take(size, self):
            self.charged += size
            return True
        self.budget_blocked = True  # resumed by _give (ours) or budget_freed (the server's)
        self.update_reading()
        return False

    def _give(self, size: int) -> None:
        self.charged -= size
        self.server.budget.give(size)
        if self.budget_blocked:
            self.loop.call_soon(self._continue_parsing)

    def _watch_progress(self) -> None:
        """Drop the client if it holds budget and makes no progress for peer_timeout: else
        a few connections that announce large WRITEs and stop sending, or stop reading
        their replies, would hold the server's whole budget and stall every client."""
        timeout = self.server.peer_timeout
        if timeout and self.stall_check is None and self.transport is not None:
            self.progress = self.loop.time()
            self.backlog = self.transport.get_write_buffer_size()
            self.stall_check = self.loop.call_later(timeout, self._check_progress)

    def _check_progress(self) -> None:
        self.stall_check = None
        transport = self.transport
        if transport is None or not (self.payload_view is not None or self.replies.held):
            return
        backlog = transport.get_write_buffer_size()
        if backlog < self.backlog:  # the client reads, if slowly
            self.progress = self.loop.time()
        self.backlog = backlog
        timeout = self.server.peer_timeout
        idle = self.loop.time() - self.progress
        if idle >= timeout:
            self.abort(f"no progress for {timeout} s while holding {self.charged} bytes "
                        "of the payload budget")
            return
        self.stall_check = self.loop.call_later(timeout - idle, self._check_progress)

    def update_reading(self) -> None:
        busy = self.handshake is not None and self.handshake.busy
        want_pause = (self.replies.paused or self.inflight >= MAX_INFLIGHT or busy
                      or self.disconnecting or self.parse_deferred or self.budget_blocked)
        if self.transport is None or want_pause == self.reading_paused:
            return
        self.reading_paused = want_pause
        if want_pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # -- input --

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.payload_view is not None:
            return self.payload_view[self.payload_pos:]
        if self.drain:
            return self.server.drain_view[:self.drain]
        if len(self.rx) - self.rx_end < p.REQUEST.size:
            # Move the unparsed tail to the front; it is always shorter than one header.
            tail = self.rx_end - self.rx_start
            self.rx[:tail] = self.rx[self.rx_start:self.rx_end]
            self.rx_start, self.rx_end = 0, tail
        return self.rx_view[self.rx_end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.drain:
            self.drain -= nbytes  # rx is empty behind a payload: nothing else to parse
            return
        if self.payload_view is not None:
            self.payload_pos += nbytes
            self.progress = self.loop.time()
            if self.payload_pos < len(self.payload_view):
                return
            payload = self.payload
            self.payload = self.payload_view = None
            flags, cmd, cookie, offset = self.payload_request
            assert payload is not None
            due = self.replies.begin_pass()
            self._execute_now(flags, cmd, cookie, offset, len(payload), payload, len(payload))
            self.replies.end_pass(due)
            return
        self.rx_end += nbytes
        try:
            if self.session is None:
                self._handshake_input()
            else:
                due = self.replies.begin_pass()
                try:
                    self._transmission_input()
                finally:
                    self.replies.end_pass(due)
                if self.server.poller is not None:  # a device working off the loop (a pool
                    self.server.poller.poke()        # thread) answers soon: stay awake
        except p.ProtocolError as e:
            # Hang up without reading further, but after the replies already produced for
            # the valid requests that came before the bad bytes (abort would discard them).
            log.warning("dropping connection: %s", e)
            self.disconnecting = True
            self.hang_up()

    def eof_received(self) -> bool:
        return False  # close our side too

    # -- from the handshake to transmission (the handshake itself: handshake_driver.py) --

    def _handshake_input(self) -> None:
        data = self.rx_view[self.rx_start:self.rx_end]
        self.rx_start = self.rx_end = 0
        assert self.handshake is not None
        self.handshake.feed(data)

    def tls_transport(self, transport: asyncio.BaseTransport) -> None:
        """STARTTLS replaced the transport (reading is on again on the new one)."""
        self.transport = self.replies.transport = transport  # type: ignore[assignment]
        self.reading_paused = False

    def begin_transmission(self, export: OpenedExport, session: TransmissionTerms,
                           rest: bytes) -> None:
        """GO or EXPORT_NAME succeeded; `rest` is what the client sent after it."""
        self.handshake_done()
        self.export = export
        self.device = export.device
        self.session = session
        self.writable = not session.tflags & p.TFLAG_READ_ONLY
        srv = self.server
        srv.export_stats.opened(export.name)
        tune_send_buffer(self.transport.get_extra_info("socket") if self.transport else None,
                         srv.budget.limit, srv.max_connections)
        self.rx = bytearray(max(RX_BUFFER, len(rest)))  # rest: at most one handshake read
        self.rx_view = memoryview(self.rx)
        self.rx[:len(rest)] = rest
        self.rx_start, self.rx_end = 0, len(rest)
        log.debug("transmission on %r, flags %#x", export.name, session.tflags)
        if rest:
            self._transmission_input()

    # -- transmission --

    def _transmission_input(self) -> None:
        rx, pos, end = self.rx, self.rx_start, self.rx_end
        unpack = p.REQUEST.unpack_from
        replies = self.replies
        device = self.device
        assert device is not None
        while end - pos >= p.REQUEST.size and not self.disconnecting:
            if replies.out_bytes >= MAX_QUEUED_OUT:
                replies.flush()  # the transport calls pause_writing if it backs up
            if replies.paused or self.inflight >= MAX_INFLIGHT:
                # The client is not reading, or is far ahead: the rest waits in rx (each
                # request in flight costs a coroutine, and rx holds 9000 headers).
                self.parse_deferred = True
                self.update_reading()
                break
            magic, flags, cmd, cookie, offset, length = unpack(rx, pos)
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolError(f"bad request magic {magic:#x}")
            if cmd == p.CMD_DISC:
                pos += p.REQUEST.size
                log.debug("client sent DISC")
                self.disconnecting = True
                self.update_reading()
                self._maybe_finish()
                break
            # Checked before anything is allocated for it.
            if not self.shutting_down and plain_io(device, self.writable, cmd, flags, offset,
                                                   length):
                err, reason, charge = 0, "", length
            else:
                err, reason = self._check(cmd, flags, offset, length)
                charge = payload_charge(cmd, length)
            if not err and charge and not self._take(charge):
                break  # the header stays in rx until the budget has room
            pos += p.REQUEST.size
            if err:
                if cmd == p.CMD_WRITE and length > MAX_DRAIN:
                    raise p.ProtocolError(f"WRITE payload of {length} bytes")
                log.debug("%s refused: %s", p.CMD_NAMES.get(cmd, cmd), reason)
                self.stats.refused(cmd, err)
                self._fail(cookie, cmd, err, reason)
                if cmd == p.CMD_WRITE:  # its payload is read and dropped, never stored
                    skip = min(end - pos, length)
                    pos += skip
                    if skip < length:
                        self.drain = length - skip
                        break
                continue
            if cmd != p.CMD_WRITE:
                self._execute_now(flags, cmd, cookie, offset, length, None, charge)
                continue
            have = min(end - pos, length)
            if have == length:
                # All of it is in rx (every small WRITE): one copy by slicing, rather than a
                # zero-filled buffer and a temporary slice copied into it (4 KiB: 0.7 µs
                # instead of 2.7 µs, timeit on this VM under load).
                payload = rx[pos:pos + length]
                pos += length
                self._execute_now(flags, cmd, cookie, offset, length, payload, charge)
                continue
            # The rest arrives straight into the payload buffer (get_buffer).
            payload = self.pool.take(length)
            view = memoryview(payload)
            # View to view: one copy (a bytearray's slice assignment would copy a memoryview
            # into a temporary first).
            view[:have] = self.rx_view[pos:pos + have]
            pos += have
            self.payload, self.payload_view = payload, view
            self.payload_pos = have
            self.payload_request = (flags, cmd, cookie, offset)
            self._watch_progress()
            break
        if pos == end:
            pos = end = 0
        self.rx_start, self.rx_end = pos, end

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        session, device = self.session, self.device
        assert session is not None and device is not None
        if self.shutting_down:
            return p.NBD_ESHUTDOWN, "server is shutting down"
        return check_request(session, device, cmd, flags, offset, length)

    def _execute_now(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
                     payload: bytearray | None, charge: int) -> None:
        """Run a checked request (holding `charge` budget bytes): inline until it first
        waits, then as a task."""
        device = self.device
        assert device is not None
        self.inflight += 1
        if self.inflight >= MAX_INFLIGHT:
            self.update_reading()
        run_inline(self.loop, self._execute(device, flags, cmd, cookie, offset, length,
                                            payload, charge), self.tasks)

    async def _execute(self, device: BlockDevice, flags: int, cmd: int, cookie: int,
                       offset: int, length: int, payload: bytearray | None,
                       charge: int) -> None:
        replies = self.replies
        # Timing costs two clock reads: one request in 16 is timed, chosen by its cookie (no
        # counter to keep), while every one is counted (stats.py).
        start = 0 if cookie & LATENCY_SAMPLE_MASK else monotonic_ns()
        try:
            if cmd == p.CMD_READ:  # here, not in a coroutine of its own: the hot path
                session = self.session
                assert session is not None
                buf = replies.read_buffer(length)
                view = memoryview(buf)
                holes: list[tuple[int, int]] = []
                if not length:
                    pass
                elif not session.structured or flags & p.CMD_FLAG_DF or not device.caps.extents:
                    await device.pread(view, offset)
                else:  # holes are not read at all: they go out as OFFSET_HOLE chunks
                    holes = await device.pread_sparse(view, offset)
                replies.data(cookie, offset, buf, view, holes, session.structured, charge)
                charge = 0  # the reply writer holds it now (or gave it back)
                return
            if cmd == p.CMD_BLOCK_STATUS:
                size = await self._block_status(device, flags, cookie, offset, length)
                if self.transport is not None:  # the reply is smaller than the reserve
                    replies.unsent += size
                    charge -= size
                return
            fua = bool(flags & p.CMD_FLAG_FUA)
            if cmd == p.CMD_WRITE:
                assert payload is not None
                if length:
                    await device.pwrite(memoryview(payload), offset, fua)
                if length >= MIN_POOLED:
                    self.pool.give(payload)  # reused once the device holds no view of it
            elif cmd == p.CMD_FLUSH:
                await device.flush()
            elif cmd == p.CMD_TRIM:
                if length:
                    await device.trim(offset, length, fua)
            elif cmd == p.CMD_WRITE_ZEROES:
                if length:
                    await device.zero(offset, length, not flags & p.CMD_FLAG_NO_HOLE,
                                      bool(flags & p.CMD_FLAG_FAST_ZERO), fua)
            elif cmd == p.CMD_CACHE:
                if length:
                    await device.cache(offset, length)
            # Only READ and BLOCK_STATUS need structured replies; the rest may stay simple.
            replies.ok(cookie)
        except OSError as e:
            error = p.nbd_error(e.errno)
            self.stats.failed(cmd, error)
            self._fail(cookie, cmd, error, e.strerror or str(e))
        except Exception as e:
            log.exception("%s failed in %s", p.CMD_NAMES[cmd], device.describe())
            self.stats.failed(cmd, p.NBD_EIO)
            self._fail(cookie, cmd, p.NBD_EIO, f"internal error: {type(e).__name__}")
        finally:
            # The figures, inline (a method call costs more than the increments): stats.py.
            self.stat_requests[cmd] += 1
            self.stat_bytes[cmd] += length
            if start:
                took = monotonic_ns() - start
                # histogram.bucket_of, inline (the clamp is needless below 4 years).
                self.stat_latency[cmd][(took >> 10).bit_length()] += 1
                self.stat_latency_ns[cmd] += took
            if charge:
                self._give(charge)
            self.inflight -= 1
            if self.inflight == MAX_INFLIGHT - 1 or self.inflight == 0:
                if self.parse_deferred and not replies.paused:
                    self.loop.call_soon(self._continue_parsing)
                # Fewer requests in flight can only resume reading, and only a paused
                # connection has anything to resume (an inline request ends here every
                # time: this runs once per request at any depth).
                if self.reading_paused:
                    self.update_reading()
                if self.disconnecting or self.shutting_down:
                    self._maybe_finish()

    def _fail(self, cookie: int, cmd: int, error: int, message: str) -> None:
        session = self.session
        assert session is not None
        self.replies.fail(cookie, cmd, session.structured, error, message)

    async def _block_status(self, device: BlockDevice, flags: int, cookie: int, offset: int,
                            length: int) -> int:
        """Send the reply; return its size (at most payload_charge(BLOCK_STATUS, length))."""
        extents = await device.extents(offset, length) if device.caps.extents else []
        reply = p.block_status_reply(cookie, offset, length,
                                     [(e.offset, e.length, e.flags) for e in extents],
                                     bool(flags & p.CMD_FLAG_REQ_ONE))
        self.replies.send(reply)
        return len(reply) - p.CHUNK.size

    # -- shutdown --

    def begin_shutdown(self) -> None:
        """Finish in-flight requests; answer new ones with ESHUTDOWN; then hang up."""
        self.shutting_down = True
        if self.handshake is not None:
            self.handshake.negotiation.shutting_down = True
        if self.session is None:
            if not (self.handshake is not None and self.handshake.busy):
                self.hang_up()
            return
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if (self.disconnecting or self.shutting_down) and self.inflight == 0:
            self.hang_up()
