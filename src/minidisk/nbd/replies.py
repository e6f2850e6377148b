"""Replies read by an NBD client: pure checks of what a server sends, beside protocol.py.

A client checks every reply header against the request it answers before it reads (and so
allocates) the payload: a length is accepted only when the request can receive that much.
Any violation is a `ReplyError` (one subclass per kind, as ovirt-imageio's nbd client names
them); the client then drops the connection and fails every request still pending on it
(the stream cannot be resynchronised). Used by nbd/client.py (transmission) and
client_negotiation.py (the handshake of every client).
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from minidisk.nbd.protocol import (
    BLOCK_STATUS_DESCRIPTOR,
    CHUNK_ERROR,
    CHUNK_OFFSET_HOLE,
    CMD_BLOCK_STATUS,
    CMD_NAMES,
    CMD_READ,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE_BLOCK_SIZE,
    INFO_TYPE_EXPORT,
    MAX_STRING,
    OFFSET,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_MINIDISK_CONTROL,
    OPT_SET_META_CONTEXT,
    OPTION_REPLY,
    REP_ACK,
    REP_FLAG_ERROR,
    REP_INFO,
    REP_META_CONTEXT,
    REP_MINIDISK_RESULT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TFLAG_HAS_FLAGS,
    U16,
    U32,
    ProtocolError,
)

# -- Transmission replies -------------------------------------------------------------------

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


class NotNBDServer(ReplyError):
    """The greeting is not a fixed-newstyle NBD server's."""


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


def parse_simple_reply(data: bytes) -> tuple[int, int]:
    """A simple reply after its magic: (NBD error, cookie)."""
    error, cookie = SIMPLE_REPLY_REST.unpack(data)
    return int(error), int(cookie)


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

    `simple` and `chunk` check a header before its payload is read; `data_chunk` and
    `hole_chunk` decode a READ chunk and take its range (`claim`), `block_status` decodes
    extents, `finished` checks a successful reply is whole. All raise ReplyError subclasses.
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

    def data_chunk(self, header: ChunkHeader, data_offset: bytes) -> tuple[int, int]:
        """An OFFSET_DATA chunk's offset field: where in the request its data goes
        (index, size), taken as `claim` does; the data itself follows."""
        (offset,) = OFFSET.unpack(data_offset)
        size = header.length - OFFSET.size
        return self.claim(offset, size), size

    def hole_chunk(self, payload: bytes) -> tuple[int, int, int]:
        """An OFFSET_HOLE chunk: (offset, index in the request, size), taken as `claim`."""
        offset, size = CHUNK_OFFSET_HOLE.unpack(payload)
        return offset, self.claim(offset, size), size

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
