"""An asyncio NBD client, and the device it makes: another server's export as a device.

`RemoteDevice.connect(uri)` performs the fixed-newstyle handshake (STARTTLS for nbds URIs,
structured replies, base:allocation, GO with block sizes) and then pipelines requests:
any number in flight, replies matched by cookie in whatever order they arrive. The
device's capabilities are exactly the remote export's transmission flags.

URIs follow libnbd (and the NBD URI spec): ``nbd://host[:port]/export``,
``nbd+unix:///export?socket=/path``, and the TLS forms ``nbds://`` and ``nbds+unix://``
with ``tls-certificates=DIR`` in the query.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import struct
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from minidisk.device.api import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockDevice,
    BlockSize,
    Caps,
    Extent,
    add_holes,
)
from minidisk.nbd import protocol as p
from minidisk.nbd.tls import client_context

log = logging.getLogger(__name__)

NBD_PORT = 10809
# Replies after their 4-byte magic, which is read first to tell the two kinds apart.
_SIMPLE_REST = struct.Struct(">IQ")
_CHUNK_REST = struct.Struct(">HHQI")


@dataclass(frozen=True, slots=True)
class NBDURI:
    export: str
    socket: str | None = None
    host: str | None = None
    port: int = NBD_PORT
    tls: bool = False
    tls_certificates: str | None = None

    @classmethod
    def parse(cls, uri: str) -> NBDURI:
        parts = urlsplit(uri)
        scheme = parts.scheme
        if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
            raise ValueError(f"{uri!r}: not an NBD URI (nbd://, nbd+unix://, nbds://...)")
        query = parse_qs(parts.query)
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        tls = scheme.startswith("nbds")
        certs = query.get("tls-certificates", [None])[0]
        if scheme.endswith("+unix"):
            sock = query.get("socket", [None])[0]
            if not sock:
                raise ValueError(f"{uri!r}: nbd+unix URI without ?socket=PATH")
            return cls(export, socket=sock, tls=tls, tls_certificates=certs)
        if not parts.hostname:
            raise ValueError(f"{uri!r}: no host")
        return cls(export, host=parts.hostname, port=parts.port or NBD_PORT, tls=tls,
                   tls_certificates=certs)


class NBDError(OSError):
    pass


class RemoteDevice(BlockDevice):
    def __init__(self, uri: NBDURI) -> None:
        self.uri = uri
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.cookies = itertools.count(1)
        self.pending: dict[int, _Pending] = {}
        self.reader_task: asyncio.Task[None] | None = None
        self.dead: BaseException | None = None
        self.structured = False
        self.base_allocation = False
        self.tflags = 0

    @classmethod
    async def connect(cls, uri: str) -> RemoteDevice:
        device = cls(NBDURI.parse(uri))
        await device._connect()
        return device

    # -- handshake --

    async def _connect(self) -> None:
        u = self.uri
        try:
            if u.socket:
                self.reader, self.writer = await asyncio.open_unix_connection(u.socket)
            else:
                self.reader, self.writer = await asyncio.open_connection(u.host, u.port)
        except OSError as e:
            raise NBDError(e.errno or errno.EIO,
                           f"cannot connect to {self.describe()}: {e.strerror or e}") from None
        try:
            await self._handshake()
        except BaseException:
            self.writer.close()
            raise
        self.reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    async def _handshake(self) -> None:
        assert self.reader is not None and self.writer is not None
        magic, opt_magic, hflags = p.GREETING.unpack(
            await self.reader.readexactly(p.GREETING.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NBDError(errno.EPROTO, "not a fixed-newstyle NBD server")
        self.writer.write(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | (
            p.FLAG_C_NO_ZEROES if hflags & p.FLAG_NO_ZEROES else 0)))
        if self.uri.tls:
            await self._option(p.OPT_STARTTLS, b"", expect_ack=True)
            if not self.uri.tls_certificates:
                raise NBDError(errno.EINVAL, "nbds URI needs ?tls-certificates=DIR")
            await self.writer.start_tls(client_context(self.uri.tls_certificates))
        replies = await self._option(p.OPT_STRUCTURED_REPLY, b"")
        self.structured = replies[-1][0] == p.REP_ACK
        if self.structured:
            replies = await self._option(p.OPT_SET_META_CONTEXT, p.meta_context_request(
                self.uri.export, [p.META_BASE_ALLOCATION]))
            self.base_allocation = any(r == p.REP_META_CONTEXT for r, _ in replies)
        replies = await self._option(p.OPT_GO, p.info_request(
            self.uri.export, [p.INFO_TYPE_BLOCK_SIZE]))
        if replies[-1][0] != p.REP_ACK:
            reply, data = replies[-1]
            raise NBDError(errno.ENOENT if reply == p.REP_ERR_UNKNOWN else errno.EACCES,
                           f"export {self.uri.export!r} refused: {data.decode(errors='replace')}")
        block = BlockSize()
        for reply, data in replies:
            if reply != p.REP_INFO:
                continue
            (info,) = p.U16.unpack_from(data)
            if info == p.INFO_TYPE_EXPORT:
                _, self.size, self.tflags = p.INFO_EXPORT.unpack(data)
            elif info == p.INFO_TYPE_BLOCK_SIZE:
                _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE.unpack(data)
                block = BlockSize(minimum, preferred, min(maximum, 32 * 1024 * 1024))
        self.block_size = block
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

    async def _option(self, option: int, data: bytes,
                      expect_ack: bool = False) -> list[tuple[int, bytes]]:
        """Send one option; collect replies up to the final ACK or error."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply, length = p.OPTION_REPLY.unpack(
                await self.reader.readexactly(p.OPTION_REPLY.size))
            if magic != p.REPLY_MAGIC or opt != option:
                raise NBDError(errno.EPROTO, f"bad option reply to {option}")
            replies.append((reply, await self.reader.readexactly(length)))
            if reply == p.REP_ACK or reply & p.REP_FLAG_ERROR:
                break
        if expect_ack and replies[-1][0] != p.REP_ACK:
            raise NBDError(errno.EPROTO, f"option {option} refused: {replies[-1][1]!r}")
        return replies

    # -- transmission --

    def _submit(self, cmd: int, flags: int, offset: int, length: int,
                payload: memoryview | None = None, buf: memoryview | None = None,
                ) -> asyncio.Future[list[Extent] | None]:
        if self.dead is not None or self.writer is None:
            raise NBDError(errno.ESHUTDOWN, f"connection to the server gone ({self.describe()})")
        cookie = next(self.cookies)
        fut: asyncio.Future[list[Extent] | None] = \
            asyncio.get_running_loop().create_future()
        self.pending[cookie] = _Pending(fut, cmd, offset, buf)
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if payload is not None:
            self.writer.writelines([header, payload])
        else:
            self.writer.write(header)
        return fut

    async def _request(self, cmd: int, flags: int, offset: int, length: int,
                       payload: memoryview | None = None,
                       buf: memoryview | None = None) -> list[Extent] | None:
        fut = self._submit(cmd, flags, offset, length, payload, buf)
        assert self.writer is not None
        await self.writer.drain()
        return await fut

    async def _read_replies(self) -> None:
        reader = self.reader
        assert reader is not None
        try:
            while True:
                (magic,) = p.U32.unpack(await reader.readexactly(4))
                if magic == p.SIMPLE_REPLY_MAGIC:
                    await self._simple_reply(reader)
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    await self._chunk(reader)
                else:
                    raise NBDError(errno.EPROTO, f"bad reply magic {magic:#x}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self._fail_all(e if isinstance(e, OSError) else
                           NBDError(errno.ECONNRESET, "server closed the connection"))
        except asyncio.CancelledError:
            self._fail_all(NBDError(errno.ESHUTDOWN, "connection closed"))
            raise

    def _fail_all(self, exc: BaseException) -> None:
        self.dead = exc
        for pending in self.pending.values():
            if not pending.future.done():
                pending.future.set_exception(exc)
        self.pending.clear()

    async def _simple_reply(self, reader: asyncio.StreamReader) -> None:
        error, cookie = _SIMPLE_REST.unpack(await reader.readexactly(_SIMPLE_REST.size))
        pending = self.pending.pop(cookie)
        if error:
            pending.future.set_exception(_error(error, pending.cmd))
            return
        if pending.cmd == p.CMD_READ and pending.buf is not None:
            pending.buf[:] = await reader.readexactly(len(pending.buf))
        pending.future.set_result(None)

    async def _chunk(self, reader: asyncio.StreamReader) -> None:
        flags, ctype, cookie, length = _CHUNK_REST.unpack(
            await reader.readexactly(_CHUNK_REST.size))
        payload = await reader.readexactly(length)
        pending = self.pending[cookie]
        if ctype == p.REPLY_TYPE_OFFSET_DATA and pending.buf is not None:
            (offset,) = p.OFFSET.unpack_from(payload)
            start = offset - pending.offset
            pending.buf[start:start + length - 8] = memoryview(payload)[8:]
        elif ctype == p.REPLY_TYPE_OFFSET_HOLE and pending.buf is not None:
            offset, size = p.CHUNK_OFFSET_HOLE.unpack(payload)
            start = offset - pending.offset
            pending.buf[start:start + size] = bytes(size)
            pending.extents.append(Extent(offset, size, EXTENT_HOLE | EXTENT_ZERO))
        elif ctype == p.REPLY_TYPE_BLOCK_STATUS:
            pos = pending.offset
            for i in range(4, length, p.BLOCK_STATUS_DESCRIPTOR.size):
                size, status = p.BLOCK_STATUS_DESCRIPTOR.unpack_from(payload, i)
                pending.extents.append(Extent(pos, size, status & 3))
                pos += size
        elif ctype & 0x8000:
            error, _ = p.CHUNK_ERROR.unpack_from(payload)
            pending.error = pending.error or error
        if flags & p.REPLY_FLAG_DONE:
            del self.pending[cookie]
            if pending.error:
                pending.future.set_exception(_error(pending.error, pending.cmd))
            else:
                pending.future.set_result(pending.extents)

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
        if self.writer is None:
            return
        if self.dead is None:
            try:
                self.writer.write(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
                await self.writer.drain()
            except OSError:
                pass
        self.writer.close()
        if self.reader_task is not None:
            self.reader_task.cancel()
        self.writer = None

    def describe(self) -> str:
        where = self.uri.socket or f"{self.uri.host}:{self.uri.port}"
        return f"nbd {where} export {self.uri.export!r}"


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[list[Extent] | None]
    cmd: int
    offset: int
    buf: memoryview | None
    error: int = 0
    extents: list[Extent] = field(default_factory=list)


def _error(nbd_err: int, cmd: int) -> NBDError:
    err = p.NBD_TO_ERRNO.get(nbd_err, errno.EINVAL)  # proto.md: unknown values mean EINVAL
    return NBDError(err, f"{p.CMD_NAMES.get(cmd, cmd)}: {os.strerror(err)}")
