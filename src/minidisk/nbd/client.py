"""An asyncio NBD client, and the device it makes: another server's export as a device.

`RemoteDevice.connect(uri)` performs the fixed-newstyle handshake (STARTTLS for nbds URIs,
structured replies, base:allocation, GO with block sizes) and then pipelines requests:
any number in flight, replies matched by cookie in whatever order they arrive. The
device's capabilities are exactly the remote export's transmission flags.

The handshake is client_negotiation.py's, driven here. The server is not trusted: each
reply is checked by replies.py's `ExpectedReply` (and the handshake's by `OptionReplies`)
before its payload is read. A violation, or a request
unanswered past the timeout (``?timeout=SECONDS`` in the URI, a minidisk extension), ends
the connection: every pending request fails (EIO, ETIMEDOUT) with the server's name, and
so does every later one. `close()` waits for the server only a bounded time.

URIs are uri.py's (libnbd's syntax): ``nbd://host[:port]/export``,
``nbd+unix:///export?socket=/path``, and the TLS forms ``nbds://`` and ``nbds+unix://``
with ``tls-certificates=DIR`` in the query.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
from dataclasses import dataclass, field

from minidisk.device.api import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockDevice,
    BlockSize,
    Caps,
    Extent,
    add_holes,
)
from minidisk.nbd import client_negotiation as cn
from minidisk.nbd import protocol as p
from minidisk.nbd import replies as r
from minidisk.nbd.tls import client_context
from minidisk.nbd.transport import Transport
from minidisk.nbd.uri import NBDURI

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
"""Seconds a request (or the handshake) may wait for the server; `?timeout=` in the URI."""
CLOSE_TIMEOUT = 5.0  # the longest close() waits for the server to take our DISC


class NBDError(OSError):
    pass


class RemoteDevice(BlockDevice):
    def __init__(self, uri: NBDURI) -> None:
        self.uri = uri
        self.timeout = DEFAULT_TIMEOUT if uri.timeout is None else uri.timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.cookies = itertools.count(1)
        self.pending: dict[int, _Pending] = {}
        self.reader_task: asyncio.Task[None] | None = None
        self.dead: NBDError | None = None
        self.structured = False
        self.base_allocation = False
        self.context_id: int | None = None  # the server's id for base:allocation
        self.tflags = 0

    @classmethod
    async def connect(cls, uri: str) -> RemoteDevice:
        parsed = NBDURI.parse(uri)
        if parsed.transport is Transport.VSOCK:
            raise ValueError(f"{uri!r}: a remote export is reached over tcp or a unix socket")
        device = cls(parsed)
        await device._connect()
        return device

    # -- handshake --

    async def _connect(self) -> None:
        u = self.uri
        try:
            async with asyncio.timeout(self.timeout):
                if u.socket:
                    self.reader, self.writer = await asyncio.open_unix_connection(u.socket)
                else:
                    self.reader, self.writer = await asyncio.open_connection(u.host, u.port)
        except TimeoutError:
            raise NBDError(errno.ETIMEDOUT, f"cannot connect to {self.describe()}: "
                           f"no answer within {self.timeout:g} s") from None
        except OSError as e:
            raise NBDError(e.errno or errno.EIO,
                           f"cannot connect to {self.describe()}: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(self.timeout):
                await self._handshake()
        except BaseException as e:
            self.writer.transport.abort()
            raise self._handshake_error(e) from None
        self.reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    def _handshake_error(self, e: BaseException) -> BaseException:
        """What the caller is told when the handshake fails: an NBDError naming the server."""
        if isinstance(e, TimeoutError):
            return NBDError(errno.ETIMEDOUT, f"{self.describe()}: no handshake within "
                            f"{self.timeout:g} s")
        if isinstance(e, r.ReplyError):
            return NBDError(errno.EPROTO, f"{self.describe()}: {e}")
        if isinstance(e, cn.OptionRefused):
            if e.option == p.OPT_GO:
                return NBDError(errno.ENOENT if e.reply == p.REP_ERR_UNKNOWN else errno.EACCES,
                                f"{self.describe()}: export refused: {e.message}")
            return NBDError(errno.EPROTO, f"{self.describe()}: option {e.option} refused: "
                            f"{e.message}")
        if isinstance(e, asyncio.IncompleteReadError):
            return NBDError(errno.ECONNRESET, f"{self.describe()}: server closed the "
                            "connection during the handshake")
        if isinstance(e, OSError) and not isinstance(e, NBDError):
            return NBDError(e.errno or errno.EIO, f"{self.describe()}: {e.strerror or e}")
        return e  # an NBDError already, or a cancellation

    async def _handshake(self) -> None:
        assert self.reader is not None and self.writer is not None
        neg = cn.ClientNegotiation(self.uri.export, tls=self.uri.tls, structured=True,
                                   base_allocation=True)
        while True:
            event = neg.next_event()
            if out := neg.data_to_send():
                self.writer.write(out)
            if event is None:
                neg.receive_data(await self.reader.readexactly(neg.wanted))
            elif isinstance(event, cn.StartTLS):
                if not self.uri.tls_certificates:
                    raise NBDError(errno.EINVAL, "nbds URI needs ?tls-certificates=DIR")
                await self.writer.start_tls(client_context(self.uri.tls_certificates))
                neg.tls_started()
            else:
                assert isinstance(event, cn.Negotiated)  # the plan ends in GO
                break
        self.structured, self.context_id = event.structured, event.context_id
        self.base_allocation = event.context_id is not None
        self.size, self.tflags = event.size, event.tflags
        if event.block_size is not None:
            minimum, preferred, maximum = event.block_size
            self.block_size = BlockSize(minimum, preferred, min(maximum, 32 * 1024 * 1024))
        else:
            self.block_size = BlockSize()
        f = self.tflags
        self.caps = Caps(
            read_only=bool(f & p.TFLAG_READ_ONLY), flush=bool(f & p.TFLAG_SEND_FLUSH),
            fua=bool(f & p.TFLAG_SEND_FUA), trim=bool(f & p.TFLAG_SEND_TRIM),
            zero=bool(f & p.TFLAG_SEND_WRITE_ZEROES),
            fast_zero=bool(f & p.TFLAG_SEND_FAST_ZERO),
            extents=self.base_allocation, cache=bool(f & p.TFLAG_SEND_CACHE),
            multi_conn=bool(f & p.TFLAG_CAN_MULTI_CONN),
            rotational=bool(f & p.TFLAG_ROTATIONAL),
        )

    # -- transmission --

    def _submit(self, cmd: int, flags: int, offset: int, length: int,
                payload: memoryview | None = None, buf: memoryview | None = None,
                ) -> _Pending:
        if self.dead is not None:
            raise NBDError(self.dead.errno, self.dead.strerror)
        if self.writer is None:
            raise NBDError(errno.ESHUTDOWN, f"connection to the server gone ({self.describe()})")
        cookie = next(self.cookies)
        pending = _Pending(asyncio.get_running_loop().create_future(), r.ExpectedReply(
            cmd, offset, length, self.structured, bool(flags & p.CMD_FLAG_REQ_ONE)), buf)
        self.pending[cookie] = pending
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if payload is not None:
            self.writer.writelines([header, payload])
        else:
            self.writer.write(header)
        return pending

    async def _request(self, cmd: int, flags: int, offset: int, length: int,
                       payload: memoryview | None = None,
                       buf: memoryview | None = None) -> list[Extent] | None:
        pending = self._submit(cmd, flags, offset, length, payload, buf)
        writer = self.writer
        assert writer is not None
        # A timer, not asyncio.timeout: the server may run this coroutine outside any task.
        timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out, cmd)
        try:
            await writer.drain()
            return await pending.future
        except asyncio.CancelledError:
            pending.buf = None  # a late reply must not write into a buffer given up on
            raise
        except ConnectionError as e:  # drain on a transport that is gone
            if self.dead is not None:
                raise NBDError(self.dead.errno, self.dead.strerror) from None
            raise NBDError(errno.ECONNRESET, f"{self.describe()}: {e}") from None
        finally:
            timer.cancel()

    def _timed_out(self, cmd: int) -> None:
        # A server that owes a reply past the bound (or stopped reading) is not trusted with
        # the next request either: the connection ends and everything pending fails.
        self._die(NBDError(errno.ETIMEDOUT, f"{self.describe()}: no reply to "
                           f"{p.CMD_NAMES.get(cmd, cmd)} within {self.timeout:g} s"))

    async def _read_replies(self) -> None:
        reader = self.reader
        assert reader is not None
        try:
            while True:
                if r.reply_magic(await reader.readexactly(4)) == p.SIMPLE_REPLY_MAGIC:
                    await self._simple_reply(reader)
                else:
                    await self._chunk(reader)
        except r.ReplyError as e:
            log.error("%s: protocol error: %s; dropping the connection", self.describe(), e)
            self._die(NBDError(errno.EIO, f"{self.describe()}: protocol error: {e}"))
        except (asyncio.IncompleteReadError, OSError):
            self._die(NBDError(errno.ECONNRESET,
                               f"{self.describe()}: server closed the connection"))
        except asyncio.CancelledError:
            self._die(NBDError(errno.ESHUTDOWN, f"{self.describe()}: connection closed"))
            raise
        except Exception as e:  # a bug here must not leave requests waiting for ever
            log.exception("%s: reading replies failed", self.describe())
            self._die(NBDError(errno.EIO, f"{self.describe()}: {type(e).__name__}: {e}"))

    def _die(self, exc: NBDError) -> None:
        """The connection cannot continue: fail everything pending with `exc`, hang up."""
        if self.dead is None:
            self.dead = exc
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(NBDError(self.dead.errno, self.dead.strerror))
        self.pending.clear()
        if self.writer is not None:
            self.writer.transport.abort()

    def _pending_for(self, cookie: int) -> _Pending:
        pending = self.pending.get(cookie)
        if pending is None:
            raise r.UnknownCookie(f"reply for cookie {cookie}, which is not pending")
        return pending

    def _settle(self, cookie: int, pending: _Pending) -> None:
        del self.pending[cookie]
        if pending.future.done():  # its caller was cancelled
            return
        if pending.error:
            pending.future.set_exception(_error(pending.error, pending.expected.cmd,
                                                pending.message))
        else:
            pending.future.set_result(pending.extents)

    async def _simple_reply(self, reader: asyncio.StreamReader) -> None:
        error, cookie = r.parse_simple_reply(await reader.readexactly(r.SIMPLE_REPLY_REST.size))
        pending = self._pending_for(cookie)
        length = pending.expected.simple(error)
        if length:  # the READ's own length: bounded by what we asked for
            data = await reader.readexactly(length)
            if pending.buf is not None:
                pending.buf[:] = data
        pending.error = error
        self._settle(cookie, pending)

    async def _chunk(self, reader: asyncio.StreamReader) -> None:
        header = r.ChunkHeader.parse(await reader.readexactly(r.CHUNK_REST.size))
        pending = self._pending_for(header.cookie)
        expected = pending.expected
        expected.chunk(header)  # the length is checked before anything is read
        kind = header.chunk_type
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            start, size = expected.data_chunk(header, await reader.readexactly(p.OFFSET.size))
            data = await reader.readexactly(size)
            if pending.buf is not None:
                pending.buf[start:start + size] = data
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            offset, start, size = expected.hole_chunk(await reader.readexactly(header.length))
            if pending.buf is not None:
                pending.buf[start:start + size] = bytes(size)
            pending.extents.append(Extent(offset, size, EXTENT_HOLE | EXTENT_ZERO))
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            payload = await reader.readexactly(header.length)
            pending.extents.extend(Extent(offset, length, status & 3) for offset, length, status
                                   in expected.block_status(payload, self.context_id))
        elif kind & r.REPLY_FLAG_ERROR_TYPE:
            error, message = r.parse_error_chunk(kind, await reader.readexactly(header.length))
            if not pending.error:
                pending.error, pending.message = error, message
        if header.done:
            if not pending.error:
                expected.finished()
            self._settle(header.cookie, pending)

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._request(p.CMD_READ, 0, offset, len(buf), buf=buf)

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        """One structured READ: the server's OFFSET_HOLE chunks are the holes."""
        chunks = await self._request(p.CMD_READ, 0, offset, len(buf), buf=buf) or []
        holes: list[tuple[int, int]] = []
        add_holes(holes, sorted((e.offset, e.length) for e in chunks))  # any chunk order
        return holes

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await self._request(p.CMD_WRITE, p.CMD_FLAG_FUA if fua else 0, offset, len(buf),
                            payload=buf)

    async def flush(self) -> None:
        await self._request(p.CMD_FLUSH, 0, 0, 0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._request(p.CMD_TRIM, p.CMD_FLAG_FUA if fua else 0, offset, length)

    async def zero(self, offset: int, length: int, may_trim: bool = False,
                   fast: bool = False, fua: bool = False) -> None:
        flags = ((0 if may_trim else p.CMD_FLAG_NO_HOLE) | (p.CMD_FLAG_FAST_ZERO if fast else 0)
                 | (p.CMD_FLAG_FUA if fua else 0))
        await self._request(p.CMD_WRITE_ZEROES, flags, offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = offset + length
        while offset < end:  # requests carry a u32 length
            step = min(end - offset, 0xFFFFFFFF & ~0xFFFFF)
            got = await self._request(p.CMD_BLOCK_STATUS, 0, offset, step) or []
            if not got:
                break
            out.extend(got)
            offset = got[-1].offset + got[-1].length
        return out

    async def cache(self, offset: int, length: int) -> None:
        await self._request(p.CMD_CACHE, 0, offset, length)

    async def close(self) -> None:
        """Say goodbye and hang up, whatever the server does: every wait here is bounded,
        and requests still pending fail with ESHUTDOWN."""
        writer, task = self.writer, self.reader_task
        if writer is None:
            return
        bound = min(self.timeout, CLOSE_TIMEOUT)
        if self.dead is None:
            writer.write(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
            self.dead = NBDError(errno.ESHUTDOWN, f"{self.describe()}: connection closed")
            writer.close()  # sends what is buffered (the DISC), then closes
            closing = asyncio.ensure_future(writer.wait_closed())
            await asyncio.wait([closing], timeout=bound)
            if not closing.done():
                closing.cancel()
            elif not closing.cancelled():
                closing.exception()  # a reset while closing is no news: retrieved, dropped
        self._die(self.dead)  # aborts the transport if the server would not take our DISC
        self.writer = None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=bound)

    def describe(self) -> str:
        return f"nbd {self.uri.where} export {self.uri.export!r}"


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[list[Extent] | None]
    expected: r.ExpectedReply
    buf: memoryview | None
    error: int = 0
    message: str = ""
    extents: list[Extent] = field(default_factory=list)


def _error(nbd_err: int, cmd: int, message: str = "") -> NBDError:
    err = p.NBD_TO_ERRNO.get(nbd_err, errno.EINVAL)  # proto.md: unknown values mean EINVAL
    said = f" ({message})" if message else ""
    return NBDError(err, f"{p.CMD_NAMES.get(cmd, cmd)}: {os.strerror(err)}{said}")
