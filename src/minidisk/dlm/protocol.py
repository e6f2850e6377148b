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

Requests (client to service) carry an `id` chosen by the client and an op; the service answers
every request exactly once, in request order, and handles the requests of one connection in
the order they were sent (so a client may send an unlock and, without waiting for its reply,
a new request that must see it)::

    {"id": 7, "op": "join", ...}  ->  {"id": 7, "ok": true, ...}
                                  or  {"id": 7, "ok": false, "errno": 11, "error": "why"}

==========  ==========================================  ==============================
op          arguments                                   result
==========  ==========================================  ==============================
hello       name (free text, shown in status),          server, version, pid, features
            features (optional list of names)           (those of the asked it grants)
join        domain                                      --
leave       domain                                      --
lock        ref, domain, name, mode, flags              lkid
convert     ref, mode, flags, lvb (hex, optional)       --
unlock      ref, flags, lvb (hex, optional)             --
cancel      ref                                         --
drop        domain, name                                --
status      after (optional: the previous page's next)  domains, clients (first page only),
                                                        next (null on the last page)
purge       domain (optional), pid (optional)           purged (count)
==========  ==========================================  ==============================

Binary forms (the JSON forms of lock/convert/unlock/cancel above are accepted too)::

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
events name locks by it, so a client can route a grant before it has seen the reply. In JSON
`mode` is a mode name (NL CR CW PR PW EX); `flags` a list of `Flag` names (NOQUEUE, QUECVT,
CONVDEADLK, PERSISTENT, IVVALBLK, ORPHAN, NOQUEUEBAST). `lvb` is the holder's 64-byte value
block (hex in JSON), sent by a PW/EX holder only when it changed it. Errors are errno numbers
(EAGAIN: a NOQUEUE request was not grantable; EDEADLK: conversion deadlock; EBUSY: a request
is pending, or nothing is; ENOENT: unknown ref or resource; EINVAL: bad arguments; past the
service's limits, `minidisk.dlm.limits`: ENOLCK for locks, EDQUOT for domains, ENOSPC for
resources, and EUSERS, in an ERROR with id 0 before a hang-up, for connections).

Status comes in pages that fit a frame, so a state of any size can be listed: each
reply's `next` is the cursor to ask the following page with. A domain or resource that goes
on from the previous page comes again with `"continued": true` and only the rest of its
members, resources or locks (`DlmClient.status` puts them together).

Events (service to client) have no id; a reply always precedes the events its request caused.
Their JSON forms, used by nothing any more but kept readable here::

    {"ev": "grant", "ref": 3, "mode": "EX", "token": 1732..., "lvb": "00..." or null,
     "seq": 4, "valid": true, "demoted": false}
    {"ev": "cancel", "ref": 3, "mode": "PR" or null}   # null: the lock is gone
    {"ev": "bast", "ref": 3, "mode": "EX"}             # someone queued wants EX
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from minidisk.dlm.engine import Flag

VERSION = 2
MAX_FRAME = 1 << 20  # what a reader accepts, and the largest reply (a page of status)
# What the service accepts from a client: the largest legitimate request (a JSON lock with
# 64-byte names and a hex value block) is a few hundred bytes, and every connection may hold
# one partial frame of this size, so it is what an idle connection can cost.
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
FEATURES = (FEATURE_GRANTED_REPLY, FEATURE_PROMPT_UNLOCK)  # what this version understands

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


class ProtocolError(Exception):
    """The peer sent something that is not this protocol; the connection must be closed."""


def encode(message: dict[str, Any]) -> bytes:
    """A JSON frame."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) >= MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body) + 1) + b"\0" + body


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


def decode_lock(body: bytes) -> tuple[int, int, int, int, str, str]:
    """(id, ref, mode, flags, domain, name) of a LOCK body."""
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
        return call_id, ref, mode, flags, domain.decode(), name.decode()
    except UnicodeDecodeError:
        raise ProtocolError("a name is not UTF-8") from None


def encode_lvb_request(head: struct.Struct, *fields: int, lvb: bytes | None) -> bytes:
    """A CONVERT or UNLOCK frame: `fields` after the length, then the lvb if any."""
    if lvb is None:
        return head.pack(head.size - 4, *fields, 0)
    lvb = bytes(lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")
    return head.pack(head.size - 4 + LVB_SIZE, *fields, 1) + lvb


def trailing_lvb(body: bytes, size: int, has_lvb: int) -> bytes | None:
    if not has_lvb:
        return None
    lvb = body[size:size + LVB_SIZE]
    if len(lvb) != LVB_SIZE:
        raise ProtocolError("short value block")
    return bytes(lvb)


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


def flags_to_wire(flags: Flag) -> list[str]:
    return [f.name for f in Flag if f and f in flags and f.name is not None]


def flags_from_wire(names: list[str]) -> Flag:
    flags = Flag.NONE
    for name in names:
        try:
            flags |= Flag[name]
        except KeyError:
            raise ValueError(f"unknown flag {name!r}") from None
    return flags


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
