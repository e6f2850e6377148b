"""Test clients for the NBD server: a raw-socket client that can send anything, and a runner
for python3-libnbd scripts (libnbd's `nbd` module exists only for /usr/bin/python3).

The raw client builds messages with minidisk.nbd.protocol's structs but parses replies by
hand from the spec's layouts, so a wrong constant in protocol.py would not hide itself.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

from tests.harness import SYSTEM_PYTHON

from minidisk.nbd import protocol as p

TIMEOUT = 10.0


class Closed(Exception):
    """The server closed (or reset) the connection."""


@dataclass
class OptionReply:
    option: int
    reply_type: int
    data: bytes


@dataclass
class Chunk:
    flags: int
    chunk_type: int
    payload: bytes


@dataclass
class Reply:
    """Everything the server sent for one cookie: a simple reply, or structured chunks."""

    cookie: int
    error: int = 0
    data: bytes = b""  # simple READ data
    simple: bool = False
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def chunk_error(self) -> int:
        for c in self.chunks:
            if c.chunk_type in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
                error: int = struct.unpack_from(">I", c.payload)[0]
                return error
        return 0

    @property
    def errno(self) -> int:
        return self.error if self.simple else self.chunk_error


class RawClient:
    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.pending: dict[int, tuple[int, int]] = {}  # cookie -> (cmd, length)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes --

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise Closed(str(e)) from None

    def send_unless_closed(self, data: bytes) -> None:
        """Send, when the server may already have hung up (the tests then check it did)."""
        try:
            self.send(data)
        except Closed:
            pass

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed(str(e)) from None
            if not chunk:
                raise Closed(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (any pending bytes are read)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        try:
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    return True
            return False
        finally:
            self.sock.settimeout(TIMEOUT)

    # -- handshake --

    def greeting(self) -> tuple[int, int, int]:
        return struct.unpack(">QQH", self.recv_exact(18))

    def handshake(self, client_flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES
                  ) -> int:
        magic, ihaveopt, hflags = self.greeting()
        assert (magic, ihaveopt) == (p.NBDMAGIC, p.IHAVEOPT)
        self.send(struct.pack(">I", client_flags))
        return hflags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)

    def read_option_reply(self) -> OptionReply:
        magic, option, reply_type, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == 0x3E889045565A9, hex(magic)
        return OptionReply(option, reply_type, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option and collect replies up to the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            r = self.read_option_reply()
            assert r.option == option, (r.option, option)
            replies.append(r)
            if r.reply_type == p.REP_ACK or r.reply_type & p.REP_FLAG_ERROR:
                if option == p.OPT_STRUCTURED_REPLY and r.reply_type == p.REP_ACK:
                    self.structured = True
                return replies

    def go(self, name: str = "", structured: bool = True, meta: bool = True,
           infos: tuple[int, ...] = ()) -> tuple[int, int]:
        """Negotiate (SR, base:allocation, GO) and return (size, transmission flags)."""
        if structured:
            if not self.structured:
                assert self.option(p.OPT_STRUCTURED_REPLY)[-1].reply_type == p.REP_ACK
            if meta:
                replies = self.option(p.OPT_SET_META_CONTEXT,
                                      p.meta_context_request(name, ["base:allocation"]))
                assert replies[-1].reply_type == p.REP_ACK, replies
        replies = self.option(p.OPT_GO, p.info_request(name, list(infos)))
        assert replies[-1].reply_type == p.REP_ACK, replies
        size, tflags = struct.unpack(">QH", info_of(replies, p.INFO_TYPE_EXPORT))
        return size, tflags

    # -- transmission --

    def send_request(self, cmd: int, cookie: int, offset: int = 0, length: int = 0,
                     flags: int = 0, payload: bytes | None = None) -> None:
        if payload is None and cmd == p.CMD_WRITE:
            payload = bytes(length)
        self.pending[cookie] = (cmd, length)
        self.send(struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
                  + (payload or b""))

    def read_message(self, replies: dict[int, Reply]) -> int | None:
        """Read one simple reply or one chunk into `replies`; the cookie if it was final."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == 0x67446698:
            error: int
            cookie: int
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            cmd, length = self.pending.pop(cookie)
            assert cookie not in replies, f"second reply for cookie {cookie}"
            reply = Reply(cookie, error=error, simple=True)
            if cmd == p.CMD_READ and error == 0:
                reply.data = self.recv_exact(length)
            replies[cookie] = reply
            return cookie
        assert magic == 0x668E33EF, f"bad reply magic {magic:#x}"
        flags: int
        chunk_type: int
        flags, chunk_type, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        assert cookie in self.pending, f"chunk for unknown cookie {cookie}"
        reply = replies.setdefault(cookie, Reply(cookie))
        assert not reply.simple
        reply.chunks.append(Chunk(flags, chunk_type, self.recv_exact(length)))
        if flags & p.REPLY_FLAG_DONE:
            del self.pending[cookie]
            return cookie
        return None

    def replies(self, count: int) -> dict[int, Reply]:
        """Read until `count` requests are complete."""
        replies: dict[int, Reply] = {}
        done = 0
        while done < count:
            if self.read_message(replies) is not None:
                done += 1
        return replies

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes | None = None, cookie: int = 1) -> Reply:
        self.send_request(cmd, cookie, offset, length, flags, payload)
        return self.replies(1)[cookie]

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """A successful READ's data, reassembled from chunks if structured."""
        reply = self.request(p.CMD_READ, offset, length, flags)
        assert reply.errno == 0, reply
        return read_data(reply, offset, length)


def info_of(replies: list[OptionReply], info_type: int) -> bytes:
    for r in replies:
        if r.reply_type == p.REP_INFO and struct.unpack_from(">H", r.data)[0] == info_type:
            return r.data[2:]
    raise AssertionError(f"no REP_INFO of type {info_type} in {replies}")


def read_data(reply: Reply, offset: int, length: int) -> bytes:
    """Reassemble a READ reply, checking the structured-reply rules of proto.md §READ."""
    if reply.simple:
        return reply.data
    assert reply.chunks[-1].flags & p.REPLY_FLAG_DONE
    assert all(not c.flags & p.REPLY_FLAG_DONE for c in reply.chunks[:-1])
    out = bytearray(length)
    covered: list[tuple[int, int]] = []
    for c in reply.chunks:
        if c.chunk_type == p.REPLY_TYPE_OFFSET_DATA:
            (start,) = struct.unpack_from(">Q", c.payload)
            data = c.payload[8:]
            size = len(data)
            assert size > 0
            out[start - offset:start - offset + size] = data
        elif c.chunk_type == p.REPLY_TYPE_OFFSET_HOLE:
            assert len(c.payload) == 12
            start, size = struct.unpack(">QI", c.payload)
            assert size > 0
        elif c.chunk_type == p.REPLY_TYPE_NONE:
            assert len(c.payload) == 0 and c.flags & p.REPLY_FLAG_DONE
            continue
        else:
            raise AssertionError(f"unexpected chunk type {c.chunk_type:#x} in a good READ")
        assert offset <= start and start + size <= offset + length, "chunk outside request"
        covered.append((start, size))
    covered.sort()
    pos = offset
    for start, size in covered:
        assert start == pos, f"chunks overlap or leave a gap at {pos}"
        pos += size
    assert pos == offset + length, "chunks do not cover the request"
    return bytes(out)


def block_status(reply: Reply) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, flags)]) of a BLOCK_STATUS reply with one context."""
    chunks = [c for c in reply.chunks if c.chunk_type == p.REPLY_TYPE_BLOCK_STATUS]
    assert len(chunks) == 1, reply
    payload = chunks[0].payload
    assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0
    (ctx,) = struct.unpack_from(">I", payload)
    extents = [struct.unpack_from(">II", payload, 4 + 8 * i)
               for i in range((len(payload) - 4) // 8)]
    return ctx, extents


# -- libnbd ---------------------------------------------------------------------------------

_PRELUDE = '''
import errno, json, os, sys
import nbd

params = json.loads(sys.argv[1])

def handle(opt_mode=True, strict=0, structured=True, meta=True):
    h = nbd.NBD()
    h.set_strict_mode(strict)
    h.set_opt_mode(opt_mode)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    return h

def err(fn, *args, **kw):
    """0 if the call succeeds, else the errno libnbd reports."""
    try:
        fn(*args, **kw)
        return 0
    except nbd.Error as e:
        # libnbd 1.14 reports the errno by name ("EINVAL")
        code = getattr(errno, e.errno, -1) if isinstance(e.errno, str) else e.errno
        return code if code is not None else -1

'''


def run_libnbd(script: str, timeout: float = 60.0, **params: Any) -> Any:
    """Run `script` under /usr/bin/python3 with libnbd; it sets `result` (JSON-able).

    `params` arrive as the dict `params`; helpers `handle()` (strict mode off, opt mode on)
    and `err(fn, ...)` (errno or 0) are predefined.
    """
    code = _PRELUDE + textwrap.dedent(script) + "\nprint(json.dumps(result))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([SYSTEM_PYTHON, "-c", code, json.dumps(params)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"libnbd script failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
