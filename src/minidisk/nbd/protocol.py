"""NBD wire format: constants, message layouts and a sans-I/O handshake reader.

Everything here is pure: no sockets, no event loop. The server, the client and the tests
build and parse messages with these structs. Layouts follow the NBD protocol document
(NetworkBlockDevice/nbd doc/proto.md); every integer is big-endian.

Errors follow ovirt-imageio's split: `ProtocolError` means the peer broke framing and the
connection must be dropped; a request-level failure is just an errno in a reply.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

# -- Handshake ------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9  # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

GREETING = struct.Struct(">QQH")
"""Server greeting: NBDMAGIC u64, IHAVEOPT u64, handshake flags u16."""

CLIENT_FLAGS = struct.Struct(">I")
"""Client flags u32, sent once after the greeting."""

OPTION_HEADER = struct.Struct(">QII")
"""Client option: IHAVEOPT u64, option u32, data length u32, then data."""

OPTION_REPLY = struct.Struct(">QIII")
"""Server option reply: REPLY_MAGIC u64, option u32, reply type u32, length u32, then data."""

EXPORT_NAME_REPLY = struct.Struct(">QH")
"""Reply to OPT_EXPORT_NAME: size u64, transmission flags u16 (+124 zero bytes unless
the client set NO_ZEROES)."""

EXPORT_NAME_ZEROES = 124  # the padding after an EXPORT_NAME reply, unless NO_ZEROES

INFO_EXPORT = struct.Struct(">HQH")
"""NBD_INFO_EXPORT: info type u16 (0), size u64, transmission flags u16."""

INFO_BLOCK_SIZE = struct.Struct(">HIII")
"""NBD_INFO_BLOCK_SIZE: info type u16 (3), minimum u32, preferred u32, maximum u32."""

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11
# minidisk's control channel: a private option carrying one JSON command (the client:
# control_client.py; the server: daemon/control.py).
# Any other server answers it with ERR_UNSUP, as for every unknown option.
OPT_MINIDISK_CONTROL = 0x4D444B01

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_MINIDISK_RESULT = 0x4D444B01  # JSON result of OPT_MINIDISK_CONTROL
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_TYPE_EXPORT = 0
INFO_TYPE_NAME = 1
INFO_TYPE_DESCRIPTION = 2
INFO_TYPE_BLOCK_SIZE = 3

META_BASE_ALLOCATION = "base:allocation"
META_CONTEXT_ID = 1  # the id a minidisk server gives base:allocation on every connection

MAX_STRING = 4096  # proto.md: strings MUST be at most 4096 bytes
MAX_EXTENTS = 1 << 20  # proto.md: a server SHOULD NOT send more descriptors than this
MAX_OPTION_DATA = 64 * 1024  # larger option payloads are a DoS; the connection is dropped

# -- Transmission ---------------------------------------------------------------------------

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
KNOWN_CMD_FLAGS = (CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE
                   | CMD_FLAG_FAST_ZERO)

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REQUEST = struct.Struct(">IHHQQI")
"""Request: magic u32, command flags u16, type u16, cookie u64, offset u64, length u32."""

SIMPLE_REPLY = struct.Struct(">IIQ")
"""Simple reply: magic u32, error u32, cookie u64 (then data for a successful READ)."""

CHUNK = struct.Struct(">IHHQI")
"""Structured reply chunk: magic u32, flags u16, type u16, cookie u64, payload length u32."""

CHUNK_OFFSET_HOLE = struct.Struct(">QI")
"""OFFSET_HOLE payload: offset u64, hole size u32."""

CHUNK_ERROR = struct.Struct(">IH")
"""ERROR payload: error u32, message length u16, then the message."""

OFFSET = struct.Struct(">Q")
BLOCK_STATUS_DESCRIPTOR = struct.Struct(">II")
"""One base:allocation extent: length u32, status flags u32."""

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# NBD error values (equal to Linux errnos, but spelled out: the wire is not the host).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM, errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO, errno.EILSEQ: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP, errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

NBD_TO_ERRNO = {
    NBD_EPERM: errno.EPERM, NBD_EIO: errno.EIO, NBD_ENOMEM: errno.ENOMEM,
    NBD_EINVAL: errno.EINVAL, NBD_ENOSPC: errno.ENOSPC, NBD_EOVERFLOW: errno.EOVERFLOW,
    NBD_ENOTSUP: errno.ENOTSUP, NBD_ESHUTDOWN: errno.ESHUTDOWN,
}


def nbd_error(err: int | None) -> int:
    """Map a host errno to the NBD error the spec allows; anything unknown is EIO."""
    return _ERRNO_TO_NBD.get(err or 0, NBD_EIO)


class ProtocolError(Exception):
    """The peer broke the protocol's framing: the connection cannot continue."""


# -- Messages built by the server -----------------------------------------------------------


def greeting() -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, chunk_type: int, length: int, done: bool) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, chunk_type,
                      cookie, length)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    payload = CHUNK_ERROR.pack(error, len(msg)) + msg
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(payload), True) + payload


def error_reply(cookie: int, cmd: int, structured: bool, error: int, message: str) -> bytes:
    """A failed request's reply: an error chunk where the request needs a structured reply
    (READ, BLOCK_STATUS once negotiated), else a simple reply (which has no message)."""
    if structured and cmd in (CMD_READ, CMD_BLOCK_STATUS):
        return error_chunk(cookie, error, message)
    return simple_reply(cookie, error)


def read_reply(cookie: int, offset: int, data: memoryview, holes: list[tuple[int, int]],
               structured: bool) -> list[bytes | memoryview]:
    """A successful READ's reply for `data` read at `offset`. Simple: the data after the
    header. Structured: OFFSET_DATA chunks around an OFFSET_HOLE chunk per (start, size)
    hole (sorted, within the read), the last one DONE; NONE for a READ of 0 bytes. Data
    goes out as views of `data`: from the buffer the device filled, never copied."""
    if not structured:
        return [simple_reply(cookie), data]
    end = offset + len(data)
    if not data:
        return [chunk_header(cookie, REPLY_TYPE_NONE, 0, True)]
    if not holes:  # the common case: one data chunk
        return [chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, OFFSET.size + len(data), True),
                OFFSET.pack(offset), data]
    parts: list[bytes | memoryview] = []
    pos = offset
    for start, size in holes:
        if start > pos:
            parts += [chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, OFFSET.size + start - pos,
                                   False),
                      OFFSET.pack(pos), data[pos - offset:start - offset]]
        parts += [chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, CHUNK_OFFSET_HOLE.size,
                               start + size == end),
                  CHUNK_OFFSET_HOLE.pack(start, size)]
        pos = start + size
    if pos < end:
        parts += [chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, OFFSET.size + end - pos, True),
                  OFFSET.pack(pos), data[pos - offset:]]
    return parts


def max_descriptors(length: int) -> int:
    """Descriptors one BLOCK_STATUS reply may carry: one per 512 bytes (finer extents end
    the reply early, which the spec allows), and never more than MAX_EXTENTS."""
    return min(MAX_EXTENTS, length // 512 + 1)


def block_status_reply(cookie: int, offset: int, length: int,
                       extents: list[tuple[int, int, int]], req_one: bool) -> bytes:
    """The BLOCK_STATUS chunk for base:allocation over [offset, offset+length) from the
    device's (offset, length, flags) extents. Descriptors stop at the first extent that is
    not contiguous (a device bug must not produce a wrong reply), at the request's end, at
    max_descriptors, after one with REQ_ONE, and after an extent cut to fit a u32; with
    none known the whole range is "allocated data", which is always a safe answer."""
    end = offset + length
    descriptors = []
    most = max_descriptors(length)
    pos = offset
    for ext_offset, ext_length, flags in extents:
        if ext_offset != pos or ext_length <= 0:
            break
        size = min(ext_length, end - pos, 0xFFFFFFFF & ~511)
        descriptors.append(BLOCK_STATUS_DESCRIPTOR.pack(size, flags & 3))
        pos += size
        if pos >= end or len(descriptors) >= most or req_one or size < ext_length:
            break
    if not descriptors:
        descriptors.append(BLOCK_STATUS_DESCRIPTOR.pack(length, 0))
    payload = U32.pack(META_CONTEXT_ID) + b"".join(descriptors)
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), True) + payload


# -- Handshake reader (server side) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: int


@dataclass(frozen=True, slots=True)
class Option:
    option: int
    data: bytes


HandshakeEvent = ClientFlags | Option


class HandshakeReader:
    """Bytes in, handshake events out: the client flags, then one event per option.

    Framing errors raise ProtocolError. The reader never buffers more than one option (at
    most MAX_OPTION_DATA bytes of payload): a larger declared length is refused at once.

    A server takes events one at a time (`append`, then `next_event` until None): what
    follows GO or EXPORT_NAME is transmission, and what follows STARTTLS is TLS, so bytes
    after such an option must stay unparsed. `feed` parses greedily, for whole streams of
    options.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._have_flags = False

    def append(self, data: bytes | memoryview) -> None:
        self._buf += data

    def next_event(self) -> HandshakeEvent | None:
        """The next complete event, or None until more bytes arrive."""
        return self._next()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events."""
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> list[HandshakeEvent]:
        self._buf += data
        events: list[HandshakeEvent] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def take_rest(self) -> bytes:
        """Bytes received after the last complete option (the start of transmission)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _next(self) -> HandshakeEvent | None:
        buf = self._buf
        if not self._have_flags:
            if len(buf) < CLIENT_FLAGS.size:
                return None
            (flags,) = CLIENT_FLAGS.unpack_from(buf)
            del buf[:CLIENT_FLAGS.size]
            self._have_flags = True
            return ClientFlags(flags)
        if len(buf) < OPTION_HEADER.size:
            return None
        magic, option, length = OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(f"option {option} declares {length} bytes of data")
        end = OPTION_HEADER.size + length
        if len(buf) < end:
            return None
        data = bytes(buf[OPTION_HEADER.size:end])
        del buf[:end]
        return Option(option, data)


# -- Option payload parsers -----------------------------------------------------------------


class OptionDataError(ValueError):
    """Badly framed option data: answered with NBD_REP_ERR_INVALID (or TOO_BIG)."""

    def __init__(self, message: str, reply: int = REP_ERR_INVALID) -> None:
        super().__init__(message)
        self.reply = reply


def _take_string(data: bytes, pos: int, length: int, what: str) -> tuple[str, int]:
    if length > MAX_STRING:
        raise OptionDataError(f"{what} is {length} bytes, over {MAX_STRING}", REP_ERR_TOO_BIG)
    end = pos + length
    if end > len(data):
        raise OptionDataError(f"{what} runs past the option data")
    try:
        return data[pos:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise OptionDataError(f"{what} is not UTF-8") from None


def _name_and_count(data: bytes, count: struct.Struct, what: str,
                    counted: str) -> tuple[str, int, int]:
    """The export name that INFO/GO and META_CONTEXT data start with, and the count after
    it (u16 or u32): (name, count, where the counted items start)."""
    if len(data) < 4 + count.size:
        raise OptionDataError(f"{what} data too short")
    (name_len,) = U32.unpack_from(data)
    name, pos = _take_string(data, 4, name_len, "export name")
    if pos + count.size > len(data):
        raise OptionDataError(f"{what} {counted} count missing")
    (n,) = count.unpack_from(data, pos)
    return name, n, pos + count.size


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """OPT_INFO / OPT_GO data: name length u32, name, count u16, count × info type u16."""
    name, count, pos = _name_and_count(data, U16, "INFO/GO", "request")
    if len(data) != pos + 2 * count:
        raise OptionDataError(f"INFO/GO declares {count} requests in {len(data) - pos} bytes")
    infos = [U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]
    return name, infos


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT data: name length u32, name, count u32, count × (len u32, query)."""
    name, count, pos = _name_and_count(data, U32, "meta context", "query")
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise OptionDataError("meta context query length missing")
        (qlen,) = U32.unpack_from(data, pos)
        query, pos = _take_string(data, pos + 4, qlen, "meta context query")
        queries.append(query)
    if pos != len(data):
        raise OptionDataError("trailing bytes after meta context queries")
    return name, queries


def info_request(name: str, infos: list[int]) -> bytes:
    raw = name.encode()
    return (U32.pack(len(raw)) + raw + U16.pack(len(infos))
            + b"".join(U16.pack(i) for i in infos))


def meta_context_request(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        out += [U32.pack(len(qb)), qb]
    return b"".join(out)
