"""NBD wire format: constants, message layouts and a sans-I/O handshake reader.

Everything here is pure: no sockets, no event loop. The server, the client and the tests
build and parse messages with these structs. Layouts follow the NBD protocol document
(NetworkBlockDevice/nbd doc/proto.md); every integer is big-endian.

Errors follow ovirt-imageio's split: `ProtocolError` means the peer broke framing and the
connection must be dropped; a request-level failure is just an errno in a reply.
"""

from __future__ import annotations

import bisect
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
# minidisk's control channel: a private option carrying one JSON command (daemon/control.py).
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

MAX_STRING = 4096  # proto.md: strings MUST be at most 4096 bytes
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


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """OPT_INFO / OPT_GO data: name length u32, name, count u16, count × info type u16."""
    if len(data) < 6:
        raise OptionDataError("INFO/GO data too short")
    (name_len,) = U32.unpack_from(data)
    name, pos = _take_string(data, 4, name_len, "export name")
    if pos + 2 > len(data):
        raise OptionDataError("INFO/GO request count missing")
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        raise OptionDataError(f"INFO/GO declares {count} requests in {len(data) - pos} bytes")
    infos = [U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]
    return name, infos


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT data: name length u32, name, count u32, count × (len u32, query)."""
    if len(data) < 8:
        raise OptionDataError("meta context data too short")
    (name_len,) = U32.unpack_from(data)
    name, pos = _take_string(data, 4, name_len, "export name")
    if pos + 4 > len(data):
        raise OptionDataError("meta context query count missing")
    (count,) = U32.unpack_from(data, pos)
    pos += 4
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


# -- Replies read by a client ---------------------------------------------------------------
#
# A client checks every reply header against the request it answers before it reads (and so
# allocates) the payload: a length is accepted only when the request can receive that much.
# Any violation is a ReplyError; the client then drops the connection and fails every request
# still pending on it (the stream cannot be resynchronised).

MAX_OPTION_REPLIES = 1024
"""Replies to one option (REP_INFO to GO, REP_SERVER to LIST...) before it counts as a flood."""

MAX_CONTROL_RESULT = 16 << 20
"""The largest REP_MINIDISK_RESULT (a JSON document: key tables, lock status)."""

MAX_BLOCK_STATUS_DESCRIPTORS = 1 << 20  # proto.md: the server SHOULD NOT send more

SIMPLE_REPLY_REST = struct.Struct(">IQ")
"""A simple reply after its magic: error u32, cookie u64."""

CHUNK_REST = struct.Struct(">HHQI")
"""A structured reply chunk after its magic: flags u16, type u16, cookie u64, length u32."""

REPLY_FLAG_ERROR_TYPE = 1 << 15  # chunk types with this bit carry an error


class ReplyError(ProtocolError):
    """The server broke the protocol in a reply; the connection cannot continue."""


class BadReplyMagic(ReplyError):
    """Neither a simple reply nor a structured chunk (or not an option reply)."""


class UnknownCookie(ReplyError):
    """A reply for a request that is not pending (never sent, or already finished)."""


class UnexpectedReply(ReplyError):
    """A reply the request cannot receive: a simple reply to a structured READ, a data chunk
    for a FLUSH, an unknown chunk or option reply type, a reply to another option."""


class BadReplyFlags(ReplyError):
    """Unknown chunk flags, or a chunk that must end the reply and does not."""


class BadReplyLength(ReplyError):
    """A declared length that does not fit its type, or more than the request may receive."""


class ChunkOutOfRange(ReplyError):
    """A READ data or hole chunk outside the requested range, or over an earlier chunk."""


class IncompleteReply(ReplyError):
    """A successful reply that leaves part of the answer out (READ bytes, block status)."""


class BadBlockStatus(ReplyError):
    """Block status for an unknown context, with no or empty extents, or past the request."""


class BadErrorChunk(ReplyError):
    """An error chunk whose message does not fit it, or that carries no error."""


class TooManyReplies(ReplyError):
    """More option replies than any option legitimately gets."""


class BadInfo(ReplyError):
    """An NBD_INFO reply of the wrong size or with impossible values."""


def reply_magic(data: bytes) -> int:
    """The magic that starts a transmission reply; only the two reply kinds are accepted."""
    (magic,) = U32.unpack(data)
    if magic not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
        raise BadReplyMagic(f"bad reply magic {magic:#x}")
    return int(magic)


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    flags: int
    chunk_type: int
    cookie: int
    length: int

    @classmethod
    def parse(cls, data: bytes) -> ChunkHeader:
        return cls(*CHUNK_REST.unpack(data))

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


_MAX_ERROR_PAYLOAD = CHUNK_ERROR.size + MAX_STRING + OFFSET.size


class ExpectedReply:
    """What one request may receive back, and the part of it received so far.

    `simple` and `chunk` check a header before its payload is read; `claim` takes a READ
    chunk's range, `block_status` decodes extents, `finished` checks a successful reply is
    whole. All raise ReplyError subclasses.
    """

    __slots__ = ("cmd", "offset", "length", "structured", "req_one", "_filled", "_covered",
                 "_status_seen")

    def __init__(self, cmd: int, offset: int, length: int, structured: bool,
                 req_one: bool = False) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.structured = structured
        self.req_one = req_one
        self._filled: list[tuple[int, int]] = []  # (start, end) in the request, sorted
        self._covered = 0
        self._status_seen = False

    @property
    def name(self) -> str:
        return CMD_NAMES.get(self.cmd, str(self.cmd))

    def simple(self, error: int) -> int:
        """Check a simple reply; the number of data bytes that follow it."""
        if self.structured and self.cmd in (CMD_READ, CMD_BLOCK_STATUS):
            raise UnexpectedReply(f"simple reply to {self.name}, which needs a structured one")
        return self.length if self.cmd == CMD_READ and not error else 0

    def chunk(self, header: ChunkHeader) -> None:
        """Check a chunk header against the request, before its payload is read."""
        if not self.structured:
            raise UnexpectedReply(f"structured chunk for {self.name}, but structured replies "
                                  "were not negotiated")
        if header.flags & ~REPLY_FLAG_DONE:
            raise BadReplyFlags(f"unknown chunk flags {header.flags:#x}")
        kind, n = header.chunk_type, header.length
        if kind == REPLY_TYPE_NONE:
            if n or not header.done:
                raise BadReplyLength(f"NONE chunk of {n} bytes, done={header.done}")
        elif kind in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
            if self.cmd != CMD_READ:
                raise UnexpectedReply(f"READ data chunk type {kind} for {self.name}")
            if kind == REPLY_TYPE_OFFSET_DATA and not OFFSET.size < n <= OFFSET.size + self.length:
                raise BadReplyLength(f"data chunk of {n} bytes for a READ of {self.length}")
            if kind == REPLY_TYPE_OFFSET_HOLE and n != CHUNK_OFFSET_HOLE.size:
                raise BadReplyLength(f"hole chunk of {n} bytes")
        elif kind == REPLY_TYPE_BLOCK_STATUS:
            if self.cmd != CMD_BLOCK_STATUS:
                raise UnexpectedReply(f"block status chunk for {self.name}")
            count, rest = divmod(n - U32.size, BLOCK_STATUS_DESCRIPTOR.size)
            if rest or not 0 < count <= MAX_BLOCK_STATUS_DESCRIPTORS:
                raise BadReplyLength(f"block status chunk of {n} bytes")
        elif kind & REPLY_FLAG_ERROR_TYPE:
            if not CHUNK_ERROR.size <= n <= _MAX_ERROR_PAYLOAD:
                raise BadReplyLength(f"error chunk of {n} bytes")
        else:
            raise UnexpectedReply(f"unknown chunk type {kind}")

    def claim(self, offset: int, size: int) -> int:
        """Take [offset, offset+size) for a data or hole chunk; its index in the request."""
        start, end = offset - self.offset, offset - self.offset + size
        if size <= 0 or start < 0 or end > self.length:
            raise ChunkOutOfRange(f"chunk at {offset}+{size} for a READ of {self.offset}"
                                  f"+{self.length}")
        filled = self._filled
        i = bisect.bisect_left(filled, (start, end))
        if (i > 0 and filled[i - 1][1] > start) or (i < len(filled) and filled[i][0] < end):
            raise ChunkOutOfRange(f"chunk at {offset}+{size} overlaps an earlier one")
        filled.insert(i, (start, end))
        self._covered += size
        return start

    def block_status(self, payload: bytes, context_id: int | None) -> list[tuple[int, int, int]]:
        """The (offset, length, flags) extents of a base:allocation chunk, within the
        request (a last extent that runs past it is cut at its end)."""
        (context,) = U32.unpack_from(payload)
        if context_id is None or context != context_id:
            raise BadBlockStatus(f"block status for context {context}, not {context_id}")
        if self._status_seen:
            raise BadBlockStatus("a second block status chunk for one context")
        self._status_seen = True
        count = (len(payload) - U32.size) // BLOCK_STATUS_DESCRIPTOR.size
        if self.req_one and count != 1:
            raise BadBlockStatus(f"{count} extents for a REQ_ONE request")
        extents = []
        pos, end = self.offset, self.offset + self.length
        for length, flags in BLOCK_STATUS_DESCRIPTOR.iter_unpack(payload[U32.size:]):
            if length == 0:
                raise BadBlockStatus("an extent of length 0")
            if pos >= end:  # proto.md: only the last extent may run past the request
                raise BadBlockStatus(f"extents past the requested {self.offset}+{self.length}")
            extents.append((pos, min(length, end - pos), flags))
            pos += length
        return extents

    def finished(self) -> None:
        """A reply ended without an error: check that it said everything."""
        if self.cmd == CMD_READ and self.structured and self._covered != self.length:
            raise IncompleteReply(f"READ reply covers {self._covered} of {self.length} bytes")
        if self.cmd == CMD_BLOCK_STATUS and not self._status_seen:
            raise IncompleteReply("block status reply without extents")


def parse_error_chunk(chunk_type: int, payload: bytes) -> tuple[int, str]:
    """An error chunk's NBD error and message."""
    error, length = CHUNK_ERROR.unpack_from(payload)
    extra = OFFSET.size if chunk_type == REPLY_TYPE_ERROR_OFFSET else 0
    known = chunk_type in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET)
    fits = CHUNK_ERROR.size + length + extra
    if fits > len(payload) or (known and fits != len(payload)):
        raise BadErrorChunk(f"error message of {length} bytes in a chunk of {len(payload)}")
    if not error:
        raise BadErrorChunk("error chunk with error 0")
    end = CHUNK_ERROR.size + length
    return error, payload[CHUNK_ERROR.size:end].decode("utf-8", errors="replace")


# -- Option replies read by a client --------------------------------------------------------

# The replies an option may get before its final one; anything else is UnexpectedReply.
_INTERIM_REPLIES = {
    OPT_LIST: REP_SERVER,
    OPT_INFO: REP_INFO,
    OPT_GO: REP_INFO,
    OPT_LIST_META_CONTEXT: REP_META_CONTEXT,
    OPT_SET_META_CONTEXT: REP_META_CONTEXT,
}
# The final reply of success, where it is not ACK.
_SUCCESS_REPLIES = {OPT_MINIDISK_CONTROL: REP_MINIDISK_RESULT}
# The longest data of each reply type (every string in them is at most MAX_STRING).
_MAX_REPLY_DATA = {
    REP_ACK: 0,
    REP_SERVER: U32.size + 2 * MAX_STRING,  # name length, name, description
    REP_INFO: U16.size + MAX_STRING,  # INFO_NAME and INFO_DESCRIPTION are the longest
    REP_META_CONTEXT: U32.size + MAX_STRING,
    REP_MINIDISK_RESULT: MAX_CONTROL_RESULT,
}


class OptionReplies:
    """The replies to one option, read as header then data: each header is checked (magic,
    option, type, length bounded) before its data is read, and their number is bounded.

        replies = OptionReplies(option)
        while not replies.add(read(replies.data_length(read(OPTION_REPLY.size)))): ...
    """

    def __init__(self, option: int) -> None:
        self.option = option
        self.replies: list[tuple[int, bytes]] = []
        self._type = 0

    def data_length(self, header: bytes) -> int:
        """Check one reply header; the number of data bytes to read next."""
        magic, option, reply, length = OPTION_REPLY.unpack(header)
        if magic != REPLY_MAGIC:
            raise BadReplyMagic(f"bad option reply magic {magic:#x}")
        if option != self.option:
            raise UnexpectedReply(f"reply for option {option} to option {self.option}")
        if len(self.replies) >= MAX_OPTION_REPLIES:
            raise TooManyReplies(f"more than {MAX_OPTION_REPLIES} replies to option {option}")
        final = _SUCCESS_REPLIES.get(option, REP_ACK)
        if reply & REP_FLAG_ERROR:
            limit = MAX_STRING
        elif reply in (final, _INTERIM_REPLIES.get(option)):
            limit = _MAX_REPLY_DATA[reply]
        else:
            raise UnexpectedReply(f"unexpected reply type {reply:#x} to option {option}")
        if length > limit:
            raise BadReplyLength(f"option {option} reply {reply:#x} of {length} bytes, "
                                 f"over {limit}")
        self._type = reply
        return int(length)

    def add(self, data: bytes) -> bool:
        """Keep the data of the reply whose header came last; True if it was the final one."""
        self.replies.append((self._type, data))
        return self._type == _SUCCESS_REPLIES.get(self.option, REP_ACK) or bool(
            self._type & REP_FLAG_ERROR)

    @property
    def final(self) -> tuple[int, bytes]:
        return self.replies[-1]

    @property
    def refused(self) -> bool:
        return bool(self.replies and self.replies[-1][0] & REP_FLAG_ERROR)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What REP_INFO replies to GO/INFO said about an export."""

    size: int
    tflags: int
    block_size: tuple[int, int, int] | None  # minimum, preferred, maximum


def export_info(replies: list[tuple[int, bytes]]) -> ExportInfo:
    """Decode and check the REP_INFO replies of an acknowledged GO (unknown infos ignored)."""
    export: tuple[int, int] | None = None
    block: tuple[int, int, int] | None = None
    for reply, data in replies:
        if reply != REP_INFO:
            continue
        if len(data) < U16.size:
            raise BadInfo(f"INFO reply of {len(data)} bytes")
        (info,) = U16.unpack_from(data)
        if info == INFO_TYPE_EXPORT:
            if len(data) != INFO_EXPORT.size:
                raise BadInfo(f"INFO_EXPORT of {len(data)} bytes")
            _, size, tflags = INFO_EXPORT.unpack(data)
            if not tflags & TFLAG_HAS_FLAGS:
                raise BadInfo(f"INFO_EXPORT transmission flags {tflags:#x} without HAS_FLAGS")
            if size >= 1 << 63:
                raise BadInfo(f"INFO_EXPORT size {size}")
            export = (size, tflags)
        elif info == INFO_TYPE_BLOCK_SIZE:
            if len(data) != INFO_BLOCK_SIZE.size:
                raise BadInfo(f"INFO_BLOCK_SIZE of {len(data)} bytes")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
            if not (_power_of_two(minimum) and minimum <= 64 * 1024 and _power_of_two(preferred)
                    and preferred >= minimum and maximum >= minimum
                    and (maximum % minimum == 0 or maximum == 0xFFFFFFFF)):
                raise BadInfo(f"impossible block size: minimum {minimum}, preferred {preferred},"
                              f" maximum {maximum}")
            block = (minimum, preferred, maximum)
    if export is None:
        raise BadInfo("GO acknowledged without INFO_EXPORT (no export size)")
    return ExportInfo(export[0], export[1], block)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def parse_meta_context_reply(data: bytes) -> tuple[int, str]:
    """REP_META_CONTEXT: the context id the server chose, and the context's name."""
    if len(data) < U32.size:
        raise BadInfo(f"META_CONTEXT reply of {len(data)} bytes")
    (context_id,) = U32.unpack_from(data)
    return context_id, data[U32.size:].decode("utf-8", errors="replace")
