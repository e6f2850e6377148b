"""Wire format between lock-manager clients and the service, as pure code (bytes in, messages
out), plus where the service's socket is.

Transport: a unix stream socket. One connection is one lock owner: when it closes, for any
reason, the service releases the owner's locks (PERSISTENT ones become orphans).

Framing: every message is one frame; the first byte of the body says what it is::

    +------------------+------------+---------------------------+
    | length: u32 (BE) | kind: u8   | rest: `length - 1` bytes  |
    +------------------+------------+---------------------------+

Kind 0 is a JSON object (UTF-8). The hot path -- lock, convert, unlock, cancel, their replies
and the grant/cancel/bast events -- has fixed binary layouts (big endian, `struct` notation
below), so that a lock+unlock costs no JSON at all. A frame over `MAX_FRAME` bytes (over
`MAX_REQUEST` from a client to the service), an unknown kind, a short binary body or a JSON
body that is not an object is a protocol error and the reader closes the connection.

Requests (client to service) carry an `id` chosen by the client; the service answers every
request exactly once, in request order, and handles the requests of one connection in the
order they were sent (so a client may send an unlock and, without waiting for its reply, a
new request that must see it). The rare operations are JSON, with an op::

    {"id": 7, "op": "join", ...}  ->  {"id": 7, "ok": true, ...}
                                  or  {"id": 7, "ok": false, "errno": 11, "error": "why"}

==========  ==========================================  ==============================
op          arguments                                   result
==========  ==========================================  ==============================
hello       name (free text, shown in status),          server, version, pid, features
            features (optional list of names)           (those of the asked it grants)
join        domain                                      --
leave       domain                                      --
drop        domain, name                                --
status      after (optional: the previous page's next)  domains, clients (first page only),
                                                        next (null on the last page)
purge       domain (optional), pid (optional)           purged (count)
==========  ==========================================  ==============================

Lock, convert, unlock and cancel, their replies and the events are binary::

    kind 1  LOCK     >IIBH id, ref, mode, flags; >H domain length, domain (UTF-8);
                      >H name length, name
    kind 2  CONVERT  >IIBHB id, ref, mode, flags, has_lvb; then 64 bytes of lvb if has_lvb
    kind 3  UNLOCK   >IIHB id, ref, flags, has_lvb; then 64 bytes of lvb if has_lvb
    kind 4  CANCEL   >II id, ref
    kind 5  UNLOCK_QUIET  as UNLOCK, but answered only when it fails (an ERROR); for
                      prompt-unlock connections, which know it is done once written
    kind 16 OK       >IQ id, lkid (0 unless the request was a lock)    -- a success reply
    kind 17 ERROR    >IH id, errno; then the message (UTF-8)           -- a failure reply
    kind 18 GRANTED  >IIQBQQB id, ref, lkid, mode, token, lvb seq, bits (as GRANT); then 64
                      bytes of lvb if bit 4 -- the reply to a LOCK granted at once, in place
                      of OK followed by GRANT (only for a client whose hello asked for the
                      "granted-reply" feature)
    kind 32 GRANT    >IBQQB ref, mode, token, lvb seq, bits (1: lvb valid, 2: demoted,
                      4: an lvb follows); then 64 bytes of lvb if bit 4
    kind 33 CANCELLED >IB ref, mode still held (255: none, the lock is gone)
    kind 34 BAST     >IB ref, mode someone queued wants

Features: a client lists in `hello` the optional behaviours it understands; the reply lists
those the service will use on that connection (an older service ignores the field and
answers none). `granted-reply`: a LOCK granted at once is answered with one GRANTED frame.
`prompt-unlock`: before handling data from any other connection, the service reads and
handles whatever this connection has already sent (still in its socket buffer), so that a
request sent by anyone after this client's write of an UNLOCK is handled after that UNLOCK --
the client may treat the lock as free for everyone once the write is done, without waiting
for the reply -- and may send it as UNLOCK_QUIET, which has none unless it fails. It costs
the service a read of this connection's socket for every other connection's wake-up, so only
a client that needs it (dlmfs) asks for it.

A reply to a JSON request is JSON; a reply to a binary request is binary. Modes are numbers
(NL 0 .. EX 5), flags the `Flag` bits.

`ref` is the client's own number for a lock, unique among its live locks on the connection;
events name locks by it, so a client can route a grant before it has seen the reply. `lvb` is
the holder's 64-byte value block, sent by a PW/EX holder only when it changed it. Errors are
errno numbers
(EAGAIN: a NOQUEUE request was not grantable; EDEADLK: conversion deadlock; EBUSY: a request
is pending, or nothing is; ENOENT: unknown ref or resource; EINVAL: bad arguments; past the
service's limits, `minidisk.dlm.limits`: ENOLCK for locks, EDQUOT for domains, ENOSPC for
resources, and EUSERS, in an ERROR with id 0 before a hang-up, for connections).

Status comes in pages that fit a frame, so a state of any size can be listed: each
reply's `next` is the cursor to ask the following page with. A domain or resource that goes
on from the previous page comes again with `"continued": true` and only the rest of its
members, resources or locks (`DlmClient.status` puts them together).

Events (service to client) have no id; a reply always precedes the events its request caused.

Every body is decoded here, once, into a frozen dataclass of `minidisk.dlm.messages`:
`decode_request` for the service, `decode_reply` for the client. A `ProtocolError` (bad
framing, a short body, a kind not expected from that side) closes the connection; a
`RequestError` (a well-framed request with bad arguments: a mode out of range, a JSON field of
the wrong type, an unknown op) fails that request alone, with EINVAL.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

from minidisk.dlm.listing import Cursor
from minidisk.dlm.messages import (
    BastEvent,
    CancelEvent,
    CancelRequest,
    ConvertRequest,
    Drop,
    ErrorReply,
    GrantedReply,
    GrantEvent,
    Hello,
    Join,
    JsonReply,
    JsonRequest,
    Leave,
    LockRequest,
    OkReply,
    Purge,
    Reply,
    Request,
    StatusRequest,
    UnlockRequest,
    build,
)
from minidisk.dlm.modes import Mode
from minidisk.dlm.state import Flag

VERSION = 2
MAX_FRAME = 1 << 20  # what a reader accepts, and the largest reply (a page of status)
# What the service accepts from a client: the largest legitimate request (a JSON status
# request with a cursor of 64-byte names) is a few hundred bytes, and every connection may
# hold one partial frame of this size, so it is what an idle connection can cost.
MAX_REQUEST = 1 << 16
DEFAULT_URL = "unix:///run/minidisk/dlm.sock"
ENV_URL = "MINIDISK_DLM"

# Body kinds.
JSON = 0
LOCK = 1
CONVERT = 2
UNLOCK = 3
CANCEL = 4
UNLOCK_QUIET = 5
OK = 16
ERROR = 17
GRANTED = 18
GRANT = 32
CANCELLED = 33
BAST = 34

NO_MODE = 255  # CANCELLED: the lock is gone
GRANT_VALID = 1
GRANT_DEMOTED = 2
GRANT_LVB = 4

FEATURE_GRANTED_REPLY = "granted-reply"
FEATURE_PROMPT_UNLOCK = "prompt-unlock"

_LENGTH = struct.Struct(">I")
# Whole frames (length prefix and kind included) for the fixed-size parts.
LOCK_HEAD = struct.Struct(">IBIIBHH")       # length, kind, id, ref, mode, flags, domain length
CONVERT_HEAD = struct.Struct(">IBIIBHB")    # length, kind, id, ref, mode, flags, has_lvb
UNLOCK_HEAD = struct.Struct(">IBIIHB")      # length, kind, id, ref, flags, has_lvb
CANCEL_FRAME = struct.Struct(">IBII")       # length, kind, id, ref
OK_FRAME = struct.Struct(">IBIQ")           # length, kind, id, lkid
ERROR_HEAD = struct.Struct(">IBIH")         # length, kind, id, errno
GRANT_HEAD = struct.Struct(">IBIBQQB")      # length, kind, ref, mode, token, seq, bits
GRANTED_HEAD = struct.Struct(">IBIIQBQQB")  # length, kind, id, ref, lkid, mode, token, seq, bits
EVENT_FRAME = struct.Struct(">IBIB")        # length, kind, ref, mode (CANCELLED, BAST)
NAME_LENGTH = struct.Struct(">H")

# Bodies (after the length prefix), for decoding.
LOCK_BODY = struct.Struct(">BIIBHH")
CONVERT_BODY = struct.Struct(">BIIBHB")
UNLOCK_BODY = struct.Struct(">BIIHB")
CANCEL_BODY = struct.Struct(">BII")
OK_BODY = struct.Struct(">BIQ")
ERROR_BODY = struct.Struct(">BIH")
GRANT_BODY = struct.Struct(">BIBQQB")
GRANTED_BODY = struct.Struct(">BIIQBQQB")
EVENT_BODY = struct.Struct(">BIB")

LVB_SIZE = 64

_MODES = tuple(Mode)
_MODE_COUNT = len(_MODES)
_FLAGS: dict[int, Flag] = {}
_GRANTED_SIZE = GRANTED_BODY.size
_GRANTED_END = GRANTED_BODY.size + LVB_SIZE


class ProtocolError(Exception):
    """The peer sent something that is not this protocol; the connection must be closed."""


class RequestError(Exception):
    """A well-framed request that cannot mean anything (a mode out of range, a JSON field of
    the wrong type, an unknown op): it is answered with EINVAL; the connection stays."""

    def __init__(self, call_id: Any, detail: str) -> None:
        super().__init__(detail)
        self.call_id = call_id  # a JSON request's id, echoed as it came
        self.detail = detail


# -- encoding --------------------------------------------------------------------------------

def encode(message: dict[str, Any]) -> bytes:
    """A JSON frame."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) >= MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body) + 1) + b"\0" + body


def encode_lock(call_id: int, ref: int, mode: int, flags: int, domain: str, name: str) -> bytes:
    return encode_lock_with(call_id, ref, mode, flags, lock_names(domain, name))


def lock_names(domain: str, name: str) -> tuple[int, bytes]:
    """The part of a LOCK frame that names the resource, for `encode_lock_with` (a client
    locking the same resource again need not encode its names again)."""
    dom, nam = domain.encode(), name.encode()
    if len(dom) > 0xFFFF or len(nam) > 0xFFFF:
        raise ValueError("name too long")
    return len(dom), dom + NAME_LENGTH.pack(len(nam)) + nam


def encode_lock_with(call_id: int, ref: int, mode: int, flags: int,
                     names: tuple[int, bytes]) -> bytes:
    dlen, tail = names
    return LOCK_HEAD.pack(LOCK_BODY.size + len(tail), LOCK, call_id, ref, mode, flags,
                          dlen) + tail


def encode_lvb_request(head: struct.Struct, *fields: int, lvb: bytes | None) -> bytes:
    """A CONVERT or UNLOCK frame: `fields` after the length, then the lvb if any."""
    if lvb is None:
        return head.pack(head.size - 4, *fields, 0)
    lvb = bytes(lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")
    return head.pack(head.size - 4 + LVB_SIZE, *fields, 1) + lvb


def encode_convert(call_id: int, ref: int, mode: int, flags: int, lvb: bytes | None) -> bytes:
    return encode_lvb_request(CONVERT_HEAD, CONVERT, call_id, ref, mode, flags, lvb=lvb)


def encode_unlock(call_id: int, ref: int, flags: int, lvb: bytes | None,
                  quiet: bool = False) -> bytes:
    return encode_lvb_request(UNLOCK_HEAD, UNLOCK_QUIET if quiet else UNLOCK, call_id, ref,
                              flags, lvb=lvb)


def encode_cancel(call_id: int, ref: int) -> bytes:
    return CANCEL_FRAME.pack(CANCEL_BODY.size, CANCEL, call_id, ref)


def encode_ok(call_id: int, lkid: int = 0) -> bytes:
    return OK_FRAME.pack(OK_BODY.size, OK, call_id, lkid)


def encode_error(call_id: int, err: int, text: str) -> bytes:
    raw = text.encode()[:4000]
    return ERROR_HEAD.pack(ERROR_BODY.size + len(raw), ERROR, call_id, err) + raw


def encode_grant(ref: int, mode: int, token: int, seq: int, valid: bool, demoted: bool,
                 lvb: bytes | None) -> bytes:
    bits = (GRANT_VALID if valid else 0) | (GRANT_DEMOTED if demoted else 0)
    if lvb is None:
        return GRANT_HEAD.pack(GRANT_BODY.size, GRANT, ref, mode, token, seq, bits)
    return GRANT_HEAD.pack(GRANT_BODY.size + LVB_SIZE, GRANT, ref, mode, token, seq,
                           bits | GRANT_LVB) + lvb


def encode_granted(call_id: int, ref: int, lkid: int, mode: int, token: int, seq: int,
                   valid: bool, demoted: bool, lvb: bytes | None) -> bytes:
    bits = (GRANT_VALID if valid else 0) | (GRANT_DEMOTED if demoted else 0)
    if lvb is None:
        return GRANTED_HEAD.pack(GRANTED_BODY.size, GRANTED, call_id, ref, lkid, mode, token,
                                 seq, bits)
    return GRANTED_HEAD.pack(GRANTED_BODY.size + LVB_SIZE, GRANTED, call_id, ref, lkid, mode,
                             token, seq, bits | GRANT_LVB) + lvb


def encode_cancelled(ref: int, mode: int | None) -> bytes:
    return EVENT_FRAME.pack(EVENT_BODY.size, CANCELLED, ref, NO_MODE if mode is None else mode)


def encode_bast(ref: int, mode: int) -> bytes:
    return EVENT_FRAME.pack(EVENT_BODY.size, BAST, ref, mode)


# -- framing ---------------------------------------------------------------------------------

class FrameDecoder:
    """Feed it bytes as they arrive; it returns the bodies of the complete frames (kind byte
    first). Checks the framing and the minimum size of binary bodies, not their contents."""

    _MIN = {JSON: 1, LOCK: LOCK_BODY.size + 2, CONVERT: CONVERT_BODY.size,
            UNLOCK: UNLOCK_BODY.size, UNLOCK_QUIET: UNLOCK_BODY.size,
            CANCEL: CANCEL_BODY.size, OK: OK_BODY.size,
            ERROR: ERROR_BODY.size, GRANTED: GRANTED_BODY.size, GRANT: GRANT_BODY.size,
            CANCELLED: EVENT_BODY.size, BAST: EVENT_BODY.size}

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = b""
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        bodies: list[bytes] = []
        at = 0
        size = len(buffer)
        minimum = self._MIN
        unpack = _LENGTH.unpack_from
        limit = self.max_frame
        while size - at >= 4:
            (length,) = unpack(buffer, at)
            if length > limit:  # refused on its header, before any of it is kept
                raise ProtocolError(f"frame of {length} bytes exceeds {limit}")
            end = at + 4 + length
            if end > size:
                break
            body = buffer[at + 4:end]
            need = minimum.get(body[0]) if body else None
            if need is None:
                raise ProtocolError("empty frame" if not body else f"unknown kind {body[0]}")
            if length < need:
                raise ProtocolError(f"short message of kind {body[0]}")
            bodies.append(body)
            at = end
        self._buffer = buffer[at:] if at < size else b""
        return bodies


# -- decoding --------------------------------------------------------------------------------

def decode_json(body: bytes | memoryview) -> dict[str, Any]:
    """The object in a kind-0 body (the kind byte included)."""
    try:
        message = json.loads(bytes(body[1:]))
    except ValueError as err:
        raise ProtocolError(f"bad JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def decode_request(body: bytes) -> Request:
    """The request in a body from a client (`FrameDecoder` checked its framing)."""
    decoder = _REQUESTS.get(body[0])
    if decoder is None:
        raise ProtocolError(f"kind {body[0]} is not a request")
    return decoder(body)


def decode_reply(body: bytes) -> Reply:
    """The reply or event in a body from the service."""
    decoder = _REPLIES.get(body[0])
    if decoder is None:
        raise ProtocolError(f"unexpected message kind {body[0]}")
    return decoder(body)


def _mode(call_id: int, number: int) -> Mode:
    if number >= _MODE_COUNT:
        raise RequestError(call_id, f"bad request: no mode {number}")
    return _MODES[number]


def _flag(bits: int) -> Flag:
    """`Flag(bits)`, cached (building an IntFlag member is slow on the hot path)."""
    flags = _FLAGS.get(bits)
    if flags is None:
        flags = Flag(bits)
        if len(_FLAGS) < 1024:
            _FLAGS[bits] = flags
    return flags


def _trailing_lvb(body: bytes, size: int, has_lvb: int) -> bytes | None:
    if not has_lvb:
        return None
    lvb = body[size:size + LVB_SIZE]
    if len(lvb) != LVB_SIZE:
        raise ProtocolError("short value block")
    return bytes(lvb)


def _decode_lock(body: bytes) -> LockRequest:
    _, call_id, ref, mode, flags, dlen = LOCK_BODY.unpack_from(body)
    at = LOCK_BODY.size + dlen
    if at + NAME_LENGTH.size > len(body):
        raise ProtocolError("short LOCK message")
    domain = body[LOCK_BODY.size:at]
    (nlen,) = NAME_LENGTH.unpack_from(body, at)
    at += NAME_LENGTH.size
    name = body[at:at + nlen]
    if len(name) != nlen:
        raise ProtocolError("short LOCK message")
    try:
        domain_text, name_text = domain.decode(), name.decode()
    except UnicodeDecodeError:
        raise ProtocolError("a name is not UTF-8") from None
    if mode >= _MODE_COUNT:
        raise RequestError(call_id, f"bad request: no mode {mode}")
    return build(LockRequest, {"call_id": call_id, "ref": ref, "mode": _MODES[mode],
                               "flags": _flag(flags), "domain": domain_text,
                               "name": name_text})


def _decode_convert(body: bytes) -> ConvertRequest:
    _, call_id, ref, mode, flags, has_lvb = CONVERT_BODY.unpack_from(body)
    return build(ConvertRequest, {"call_id": call_id, "ref": ref, "mode": _mode(call_id, mode),
                                  "flags": _flag(flags),
                                  "lvb": _trailing_lvb(body, CONVERT_BODY.size, has_lvb)})


def _decode_unlock(body: bytes) -> UnlockRequest:
    kind, call_id, ref, flags, has_lvb = UNLOCK_BODY.unpack_from(body)
    return build(UnlockRequest, {"call_id": call_id, "ref": ref, "flags": _flag(flags),
                                 "lvb": _trailing_lvb(body, UNLOCK_BODY.size, has_lvb),
                                 "quiet": kind == UNLOCK_QUIET})


def _decode_cancel(body: bytes) -> CancelRequest:
    _, call_id, ref = CANCEL_BODY.unpack_from(body)
    return build(CancelRequest, {"call_id": call_id, "ref": ref})


def _text(message: dict[str, Any], key: str) -> str:
    value = message[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, not {value!r}")
    return value


def _optional(message: dict[str, Any], key: str, kind: type[Any]) -> Any:
    value = message.get(key)
    if value is not None and type(value) is not kind:  # bool is not an int here
        raise TypeError(f"{key} must be a {kind.__name__} or null, not {value!r}")
    return value


def _cursor(value: Any) -> Cursor:
    """A status cursor from the wire: [domain, resource, locks listed]."""
    if (not isinstance(value, list) or len(value) != 3 or not isinstance(value[0], str)
            or not isinstance(value[1], str) or type(value[2]) is not int):
        raise ValueError(f"bad status cursor {value!r}")
    return value[0], value[1], value[2]


def _hello(call_id: Any, message: dict[str, Any]) -> Hello:
    asked = message.get("features")
    features = (None if not isinstance(asked, list)
                else tuple(name for name in asked if isinstance(name, str)))
    name = message.get("name", "")
    return Hello(call_id, name if isinstance(name, str) else str(name), features)


def _status(call_id: Any, message: dict[str, Any]) -> StatusRequest:
    after = message.get("after")
    return StatusRequest(call_id, None if after is None else _cursor(after))


_JSON_REQUESTS: dict[str, Callable[[Any, dict[str, Any]], JsonRequest]] = {
    "hello": _hello,
    "join": lambda call_id, m: Join(call_id, _text(m, "domain")),
    "leave": lambda call_id, m: Leave(call_id, _text(m, "domain")),
    "drop": lambda call_id, m: Drop(call_id, _text(m, "domain"), _text(m, "name")),
    "status": _status,
    "purge": lambda call_id, m: Purge(call_id, _optional(m, "domain", str),
                                      _optional(m, "pid", int)),
}


def _decode_json_request(body: bytes) -> JsonRequest:
    message = decode_json(body)
    call_id = message.get("id")
    op = message.get("op")
    decoder = _JSON_REQUESTS.get(op) if isinstance(op, str) else None
    if decoder is None:
        raise RequestError(call_id, f"unknown op {op!r}")
    try:
        return decoder(call_id, message)
    except (KeyError, ValueError, TypeError) as err:
        raise RequestError(call_id, f"bad request: {err!r}") from None


_REQUESTS: dict[int, Callable[[bytes], Request]] = {
    JSON: _decode_json_request, LOCK: _decode_lock, CONVERT: _decode_convert,
    UNLOCK: _decode_unlock, UNLOCK_QUIET: _decode_unlock, CANCEL: _decode_cancel,
}


def _reply_mode(number: int) -> Mode:
    if number >= _MODE_COUNT:
        raise ProtocolError(f"no mode {number}")
    return _MODES[number]


def _decode_ok(body: bytes) -> OkReply:
    _, call_id, lkid = OK_BODY.unpack_from(body)
    return build(OkReply, {"call_id": call_id, "lkid": lkid})


def _decode_error(body: bytes) -> ErrorReply:
    _, call_id, err = ERROR_BODY.unpack_from(body)
    return ErrorReply(call_id, err, body[ERROR_BODY.size:].decode(errors="replace"))


def _decode_granted(body: bytes) -> GrantedReply:
    _, call_id, ref, lkid, mode, token, seq, bits = GRANTED_BODY.unpack_from(body)
    if mode >= _MODE_COUNT:
        raise ProtocolError(f"no mode {mode}")
    # (Inlined `_trailing_lvb`: this is the reply to nearly every lock.)
    lvb = body[_GRANTED_SIZE:_GRANTED_END] if bits & GRANT_LVB else None
    if lvb is not None and len(lvb) != LVB_SIZE:
        raise ProtocolError("short value block")
    return build(GrantedReply, {
        "ref": ref, "mode": _MODES[mode], "token": token, "lvb_seq": seq,
        "lvb_valid": bits & GRANT_VALID != 0, "demoted": bits & GRANT_DEMOTED != 0,
        "lvb": lvb, "call_id": call_id, "lkid": lkid})


def _decode_grant(body: bytes) -> GrantEvent:
    _, ref, mode, token, seq, bits = GRANT_BODY.unpack_from(body)
    return build(GrantEvent, {
        "ref": ref, "mode": _reply_mode(mode), "token": token, "lvb_seq": seq,
        "lvb_valid": bits & GRANT_VALID != 0, "demoted": bits & GRANT_DEMOTED != 0,
        "lvb": _trailing_lvb(body, GRANT_BODY.size, bits & GRANT_LVB)})


def _decode_cancelled(body: bytes) -> CancelEvent:
    _, ref, mode = EVENT_BODY.unpack_from(body)
    return build(CancelEvent, {"ref": ref, "mode": None if mode == NO_MODE else _reply_mode(mode)})


def _decode_bast(body: bytes) -> BastEvent:
    _, ref, mode = EVENT_BODY.unpack_from(body)
    return build(BastEvent, {"ref": ref, "mode": _reply_mode(mode)})


def _decode_json_reply(body: bytes) -> JsonReply | ErrorReply:
    message = decode_json(body)
    call_id = message.get("id")
    if type(call_id) is not int:  # the service echoes our ids, which are numbers
        raise ProtocolError(f"a reply with id {call_id!r}")
    if message.get("ok"):
        return JsonReply(call_id, message)
    err = message.get("errno")
    if type(err) is not int:
        raise ProtocolError(f"a failure without an errno: {message!r}"[:200])
    return ErrorReply(call_id, err, str(message.get("error", "")))


_REPLIES: dict[int, Callable[[bytes], Reply]] = {
    JSON: _decode_json_reply, OK: _decode_ok, ERROR: _decode_error, GRANTED: _decode_granted,
    GRANT: _decode_grant, CANCELLED: _decode_cancelled, BAST: _decode_bast,
}


def socket_path(url: str | None = None) -> str:
    """The socket path for `url`, else $MINIDISK_DLM, else `DEFAULT_URL`.

    Accepts `unix:///abs/path`, `unix://relative/path` (relative to the working directory, as
    the NBD listeners read it) and a bare path.
    """
    url = url or os.environ.get(ENV_URL) or DEFAULT_URL
    if url.startswith("unix://"):
        path = url[len("unix://"):]
    elif "://" in url:
        raise ValueError(f"unsupported lock manager URL {url!r} (want unix://PATH)")
    else:
        path = url
    if not path:
        raise ValueError(f"no socket path in {url!r}")
    return path
