"""Wire format between lock-manager clients and the service, as pure code (bytes in, messages
out), plus where the service's socket is.

Transport: a unix stream socket. One connection is one lock owner: when it closes, for any
reason, the service releases the owner's locks (PERSISTENT ones become orphans).

Framing: every message is one frame::

    +------------------+-----------------------------------+
    | length: u32 (BE) | body: `length` bytes of UTF-8 JSON |
    +------------------+-----------------------------------+

The body is a JSON object; a frame over `MAX_FRAME` bytes or a body that is not an object is
a protocol error and the service closes the connection.

Requests (client to service) carry an `id` chosen by the client and an `op`; the service answers
every request exactly once, in request order::

    {"id": 7, "op": "lock", ...}  ->  {"id": 7, "ok": true, ...}
                                  or  {"id": 7, "ok": false, "errno": 11, "error": "why"}

==========  ==========================================  ==============================
op          arguments                                   result
==========  ==========================================  ==============================
hello       name (free text, shown in status)           server, version, pid
join        domain                                      --
leave       domain                                      --
lock        ref, domain, name, mode, flags              lkid
convert     ref, mode, flags, lvb (hex, optional)       --
unlock      ref, flags, lvb (hex, optional)             --
cancel      ref                                         --
drop        domain, name                                --
status      --                                          domains (engine snapshot), clients
purge       domain (optional), pid (optional)           purged (count)
==========  ==========================================  ==============================

`ref` is the client's own number for a lock, unique among its live locks on the connection;
events name locks by it, so a client can route a grant before it has seen the reply. `mode` is
a mode name (NL CR CW PR PW EX); `flags` a list of `Flag` names (NOQUEUE, QUECVT, CONVDEADLK,
PERSISTENT, IVVALBLK, ORPHAN, NOQUEUEBAST). `lvb` is the holder's 64-byte value block in hex,
sent by a PW/EX holder only when it changed it. Errors are errno numbers (EAGAIN: a NOQUEUE
request was not grantable; EDEADLK: conversion deadlock; EBUSY: a request is pending, or
nothing is; ENOENT: unknown ref or resource; EINVAL: bad arguments).

Events (service to client) have `ev` instead of `id`; a reply always precedes the events its
request caused::

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

VERSION = 1
MAX_FRAME = 1 << 20
DEFAULT_URL = "unix:///run/minidisk/dlm.sock"
ENV_URL = "MINIDISK_DLM"

_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not this protocol; the connection must be closed."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Feed it bytes as they arrive; it returns the complete messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            try:
                message = json.loads(self._buffer[_LENGTH.size:end])
            except ValueError as err:
                raise ProtocolError(f"bad JSON: {err}") from None
            if not isinstance(message, dict):
                raise ProtocolError("a message must be a JSON object")
            messages.append(message)
            del self._buffer[:end]
        return messages


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
