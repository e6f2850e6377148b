"""A structure-aware NBD protocol fuzzer: mutated sessions against a running `minidisk serve`,
a witness connection doing verified I/O meanwhile, findings with the seed that replays them.

Used by tests/nbd/test_fuzz.py (bounded, in CI) and, run as `python -m tests.nbd.fuzz_engine`
from the checkout, by scripts/fuzz-nbd (as long as asked; `--help`).

How a session is judged. Every message starts as a valid one built with
minidisk.nbd.protocol's structs; fields (option codes, lengths, names, info requests, commands,
flags, offsets, lengths, cookies, magics) and sometimes raw bytes are then mutated. The bytes
actually sent are parsed again by an independent model of the server's framing (fixed
newstyle options: 16-byte header + declared data, at most protocol.MAX_OPTION_DATA; requests:
28-byte header, WRITE followed by its payload), which says what the server owes for them:

* a complete option → option replies ending in ACK or an error (EXPORT_NAME: its reply or a
  hang-up; ABORT: an optional ACK, then a hang-up);
* a complete request → exactly one reply with its cookie (DISC: replies to what came before,
  then a hang-up);
* a framing violation (bad magic, unknown client flags, an option over the limit) → a hang-up
  (replies to what came before are optional);
* a message cut short → nothing: the server may wait for the rest, so the fuzzer stops
  sending after it and closes the connection itself.

Nothing is sent after a message that ends the conversation, so a reset can never eat a reply
that was owed. Hence a "hang" finding (no reply and no hang-up within the timeout, although the
server had everything it needed to answer) is real, and so is "closed" (a hang-up where the
spec asks for a reply). Replies are checked too: magics, cookies, option codes, reply types,
chunk bounds and coverage, error values (EIO from these backends is an internal error),
requests that must fail (past the end, unknown command or flag) that succeeded, and requests
left as generated (aligned, in range, advertised) that failed.

Writes never land in the last eighth of an export (the witness region): a mutated write whose
range is valid and overlaps it is moved below it; one that runs past the end is sent as it is,
and the server must refuse it whole (the witness would see it otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import SYSTEM_PYTHON
from tests.nbd import nbd_helpers

from minidisk.nbd import protocol as p

SESSION_TIMEOUT = 10.0  # no progress for this long, with a reply owed: a hang
RECORD_LIMIT = 4096  # bytes of each session's input kept for a finding's reproducer
SEND_LIMIT = 1 << 20  # WRITE payloads up to this are sent whole (more: see _write_payload)
MUST_ACCEPT = 32 << 20  # proto.md: payloads up to this SHOULD NOT be treated as a DoS
BIG_WRITE = MUST_ACCEPT + (1 << 20)
BLOCK = 4096
KNOWN_ERRORS = {p.NBD_EPERM, p.NBD_EIO, p.NBD_ENOMEM, p.NBD_EINVAL, p.NBD_ENOSPC,
                p.NBD_EOVERFLOW, p.NBD_ENOTSUP, p.NBD_ESHUTDOWN}
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


@dataclass(frozen=True)
class Target:
    """An export the fuzzer attacks and the witness watches (its last eighth)."""

    name: str
    size: int

    @property
    def guard(self) -> int:
        """Where the witness region starts: fuzz writes stay below it."""
        return guard_of(self.size)


def guard_of(size: int) -> int:
    return (size - size // 8) // BLOCK * BLOCK


@dataclass
class Finding:
    kind: str  # hang | closed | bad-reply | wrong-answer | internal-error | fuzzer-error
    detail: str
    session_seed: int
    sent: bytes = b""

    def describe(self) -> str:
        return (f"{self.kind}: {self.detail} (session seed {self.session_seed}; replay with "
                f"scripts/fuzz-nbd --session {self.session_seed}; first {len(self.sent)} bytes "
                f"sent: {self.sent[:256].hex()})")


class Closed(Exception):
    """The server hung up."""


class Hang(Exception):
    """The server neither answered nor hung up within the timeout."""


class Broken(Exception):
    """The server broke the protocol (a finding of kind bad-reply or wrong-answer)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


# -- the connection -------------------------------------------------------------------------


class Peer:
    """A unix-socket connection that sends and receives at once (the server may stop reading
    until its replies are read) and keeps what was sent, for the reproducer."""

    def __init__(self, path: str, timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.rx = bytearray()
        self.eof = False
        self.sent = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> None:
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.rx += chunk

    def send(self, data: bytes) -> None:
        if len(self.sent) < RECORD_LIMIT:
            self.sent += data[:RECORD_LIMIT - len(self.sent)]
        view = memoryview(data)
        while view and not self.eof:
            readable, writable, _ = select.select([self.sock], [self.sock], [], self.timeout)
            if not readable and not writable:
                raise Hang(f"server stopped reading with {len(view)} bytes left to send")
            if readable:
                self._receive()
            if writable:
                try:
                    view = view[self.sock.send(view):]
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    self.eof = True

    def recv_exact(self, n: int) -> bytes:
        while len(self.rx) < n:
            if self.eof:
                raise Closed(f"EOF with {len(self.rx)} of {n} bytes")
            readable, _, _ = select.select([self.sock], [], [], self.timeout)
            if not readable:
                raise Hang(f"no reply within {self.timeout} s (waiting for {n} bytes)")
            self._receive()
        out = bytes(self.rx[:n])
        del self.rx[:n]
        return out

    def expect_eof(self) -> None:
        """Read (and drop) until the server hangs up."""
        while not self.eof:
            readable, _, _ = select.select([self.sock], [], [], self.timeout)
            if not readable:
                raise Hang(f"no hang-up within {self.timeout} s")
            self._receive()
            self.rx.clear()


# -- handshake: generation ------------------------------------------------------------------

# Options after which the server stops reading options (or may): sent last in a batch.
_TERMINAL = {p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_GO, p.OPT_STARTTLS, p.OPT_MINIDISK_CONTROL}
_NON_FINAL_REPLIES = {p.REP_SERVER: {p.OPT_LIST},
                      p.REP_INFO: {p.OPT_INFO, p.OPT_GO},
                      p.REP_META_CONTEXT: {p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT}}
_QUERIES = ["base:allocation", "base:", "", "qemu:dirty-bitmap:x", "base:allocation\0",
            "x" * 300, "\u00e9t\u00e9", "base:allocationX"]


def _random_name(rng: random.Random, targets: list[Target]) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(targets).name
    if roll < 0.6:
        return ""
    if roll < 0.7:
        return "/" * rng.randint(1, 3) + rng.choice(targets).name
    if roll < 0.8:
        return rng.choice(targets).name + rng.choice(["/", "\0", "x", "/.."])
    if roll < 0.9:
        return "x" * rng.choice([1, 255, 256, 4096, 4097, 5000])
    return "".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(1, 20)))


def _control_body(rng: random.Random) -> bytes:
    """Bodies for the control option that are never a real command (we run as its admin)."""
    return rng.choice([
        b'{"command": []}', b'{"command": {}}', b'{"command": null}', b"{}", b"[]", b"",
        b"\xff\xfe", b'{"command": "fuzz-' + rng.randbytes(4).hex().encode() + b'"}',
        b"[" * rng.choice([10, 1000, 30000]) + b"]" * rng.choice([0, 10]),
        b'{"command": "fuzz-x", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        rng.randbytes(rng.randint(1, 64)),
    ])


def _valid_option(rng: random.Random, targets: list[Target]) -> tuple[int, bytes]:
    roll = rng.randrange(12)
    if roll == 0:
        return p.OPT_LIST, b""
    if roll == 1:
        return p.OPT_STRUCTURED_REPLY, b""
    if roll in (2, 3, 4):
        opt = p.OPT_INFO if roll < 4 else p.OPT_GO
        infos = [rng.choice([0, 1, 2, 3, rng.randrange(1 << 16)])
                 for _ in range(rng.choice([0, 0, 1, 2, 4, 40]))]
        return opt, p.info_request(_random_name(rng, targets), infos)
    if roll in (5, 6):
        opt = p.OPT_LIST_META_CONTEXT if roll == 5 else p.OPT_SET_META_CONTEXT
        queries = [rng.choice(_QUERIES) for _ in range(rng.choice([0, 1, 1, 2, 5]))]
        return opt, p.meta_context_request(_random_name(rng, targets), queries)
    if roll == 7:
        return p.OPT_STARTTLS, b""
    if roll == 8:
        return p.OPT_EXPORT_NAME, _random_name(rng, targets).encode()
    if roll == 9:
        return p.OPT_MINIDISK_CONTROL, _control_body(rng)
    if roll == 10:
        return p.OPT_ABORT, b""
    opt = rng.choice([0, p.OPT_PEEK_EXPORT, p.OPT_EXTENDED_HEADERS, 12, 99, 0x7FFFFFFF,
                      p.REP_FLAG_ERROR | 1, _U32, rng.randrange(1 << 32)])
    if opt == p.OPT_MINIDISK_CONTROL:
        opt = 99
    return opt, rng.randbytes(rng.choice([0, 0, 1, 8, 100]))


def _mutate_data(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    roll = rng.randrange(6)
    if roll == 0 and buf:
        del buf[rng.randrange(len(buf)):]  # truncated
    elif roll == 1:
        buf += rng.randbytes(rng.randint(1, 16))  # trailing garbage
    elif roll == 2 and len(buf) >= 4:  # the leading length field (names): huge or off by one
        value = rng.choice([_U32, 1 << 31, 4097, len(buf), len(buf) - 3])
        buf[0:4] = struct.pack(">I", max(0, value) & _U32)
    elif roll == 3 and len(buf) >= 2:  # the trailing count field (INFO/GO requests)
        buf[-2:] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, rng.randrange(1 << 16)]))
    else:
        for _ in range(rng.randint(1, 4)):
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def _option_message(rng: random.Random, opt: int, data: bytes) -> bytes:
    """Header + data, the header's fields possibly mutated."""
    magic, length = p.IHAVEOPT, len(data)
    roll = rng.random()
    if roll < 0.02:
        magic = rng.choice([0, p.NBDMAGIC, p.IHAVEOPT ^ 1, rng.getrandbits(64)])
    elif roll < 0.05:
        length = rng.choice([p.MAX_OPTION_DATA + 1, _U32, 1 << 31])
        data = b""  # not sent: the server must refuse the length, not wait for the data
    elif roll < 0.10:
        length = max(0, length + rng.choice([-3, -1, 1, 5, 100]))  # misframed
    return p.OPTION_HEADER.pack(magic, opt, length) + data


def _client_flags(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.95:
        flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if rng.random() < 0.5 else 0)
    elif roll < 0.99:
        flags = rng.choice([0, p.FLAG_C_NO_ZEROES, 4, 0x80000001, rng.getrandbits(32)])
    else:
        return rng.randbytes(rng.randint(1, 3))  # cut short
    return p.CLIENT_FLAGS.pack(flags)


def _flip_bytes(rng: random.Random, data: bytes, start: int) -> bytes:
    buf = bytearray(data)
    if len(buf) > start:
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(start, len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _send_option(peer: Peer, opt: int, data: bytes) -> OptionSent:
    peer.send(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
    return OptionSent(opt, data)


# -- handshake: the framing model -----------------------------------------------------------


@dataclass(frozen=True)
class OptionSent:
    option: int
    data: bytes


@dataclass(frozen=True)
class FlagsSent:
    flags: int


@dataclass(frozen=True)
class Violation:
    """Framing the server must hang up on."""

    reason: str


@dataclass(frozen=True)
class Cut:
    """A message cut short: the server may wait for the rest. `may_hang_up`: the message
    announced more than a server must accept (a WRITE over 32 MiB), so it may also hang up
    at once, dropping replies it owed. `write`: a WRITE whose header was sent whole; the
    server may refuse it before its payload arrives (and must drain the payload then)."""

    may_hang_up: bool = False
    write: Request | None = None


Event = OptionSent | FlagsSent | Violation | Cut


def parse_options(data: bytes, need_flags: bool) -> tuple[list[Event], int]:
    """What the server sees in `data`, and how many bytes of it count (nothing after an event
    that ends the conversation is sent)."""
    events: list[Event] = []
    pos = 0
    if need_flags:
        if len(data) < 4:
            return [Cut()], len(data)
        (flags,) = struct.unpack_from(">I", data)
        pos = 4
        events.append(FlagsSent(flags))
        if flags & ~3 or not flags & 1:
            return events, pos
    while pos < len(data):
        if len(data) - pos < 16:
            events.append(Cut())
            return events, len(data)
        magic, opt, length = struct.unpack_from(">QII", data, pos)
        if magic != p.IHAVEOPT:
            events.append(Violation(f"option magic {magic:#x}"))
            return events, pos + 16
        if length > p.MAX_OPTION_DATA:
            events.append(Violation(f"option {opt} declares {length} bytes"))
            return events, pos + 16
        if len(data) - pos - 16 < length:
            events.append(Cut())
            return events, len(data)
        events.append(OptionSent(opt, data[pos + 16:pos + 16 + length]))
        pos += 16 + length
        if opt in _TERMINAL:
            return events, pos
    return events, pos


# -- transmission: generation ---------------------------------------------------------------


@dataclass
class Request:
    magic: int
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int
    payload: bytes | None = None  # WRITE: the payload, when it is sent whole
    valid: bool = False  # generated valid (aligned, in range, flags it may carry)

    def header(self) -> bytes:
        return p.REQUEST.pack(self.magic, self.flags & 0xFFFF, self.cmd & 0xFFFF,
                              self.cookie & _U64, self.offset & _U64, self.length & _U32)

    @property
    def has_payload(self) -> bool:
        return self.cmd == p.CMD_WRITE and self.magic == p.REQUEST_MAGIC


@dataclass
class Session:
    structured: bool
    meta: bool
    size: int
    tflags: int


_WEIGHTED_CMDS = ([p.CMD_READ] * 30 + [p.CMD_WRITE] * 25 + [p.CMD_FLUSH] * 5
                  + [p.CMD_TRIM] * 8 + [p.CMD_WRITE_ZEROES] * 8 + [p.CMD_CACHE] * 5
                  + [p.CMD_BLOCK_STATUS] * 10 + [p.CMD_DISC] * 2 + [-1] * 7)
_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)


def _edge_offset(rng: random.Random, size: int) -> int:
    return rng.choice([size, size - 1, size - 511, size + 1, 1 << 63, _U64, _U64 - 511,
                       1 << 32, rng.getrandbits(64)])


def _edge_length(rng: random.Random, size: int) -> int:
    return rng.choice([0, 1, 511, size, size + 1, 32 << 20, (32 << 20) + 1, 64 << 20,
                       (128 << 20) + 1, _U32, rng.getrandbits(32)])


def _request(rng: random.Random, session: Session, cookie: int) -> Request:
    size = session.size
    guard = guard_of(size)
    cmd = rng.choice(_WEIGHTED_CMDS)
    known = cmd >= 0
    if not known:
        cmd = rng.choice([8, 9, 15, 0x100, 0xFFFF, rng.randrange(1 << 16)])
    aligned = rng.random() < 0.8
    unit = 512 if aligned else 1
    length = rng.choice([unit, unit * rng.randint(1, 16), unit * rng.randint(1, 256)])
    length = min(length, max(guard - unit, unit))
    offset = rng.randrange(0, max(guard - length, 1) // unit + 1) * unit
    flags = 0
    if cmd == p.CMD_WRITE and rng.random() < 0.2:
        flags |= p.CMD_FLAG_FUA
    if cmd == p.CMD_WRITE_ZEROES:
        flags |= rng.choice([0, p.CMD_FLAG_NO_HOLE, p.CMD_FLAG_FAST_ZERO])
    if cmd == p.CMD_BLOCK_STATUS and rng.random() < 0.3:
        flags |= p.CMD_FLAG_REQ_ONE
    if cmd == p.CMD_READ and session.structured and rng.random() < 0.2:
        flags |= p.CMD_FLAG_DF
    if cmd in (p.CMD_FLUSH, p.CMD_DISC):
        offset = length = 0
    req = Request(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    if rng.random() < 0.01:
        req.magic = rng.choice([0, p.SIMPLE_REPLY_MAGIC, p.REQUEST_MAGIC ^ 0x100,
                                rng.getrandbits(32)])
    mutations = rng.choice([0, 0, 0, 1, 1, 2])
    req.valid = known and aligned and not mutations and req.magic == p.REQUEST_MAGIC
    for _ in range(mutations):  # field mutations
        which = rng.randrange(5)
        if which == 0:
            req.flags = rng.choice([1 << rng.randrange(16), 0xFFFF, rng.randrange(1 << 16),
                                    p.CMD_FLAG_DF, p.CMD_FLAG_FAST_ZERO, p.CMD_FLAG_REQ_ONE])
        elif which == 1:
            req.cmd = rng.choice([rng.randrange(8), 8, 0xFFFF, rng.randrange(1 << 16)])
        elif which == 2:
            req.offset = _edge_offset(rng, size)
        elif which == 3:
            req.length = _edge_length(rng, size)
        else:
            req.offset, req.length = rng.randrange(size), rng.randrange(1, 2 * size)
    _keep_out_of_witness(req, size)
    if req.cmd == p.CMD_WRITE and req.length <= SEND_LIMIT:
        req.payload = rng.randbytes(req.length)
    return req


def _keep_out_of_witness(req: Request, size: int) -> None:
    """A write the server may carry out never touches the witness region; one past the end
    is left as it is (the server must refuse it, and the witness checks that it did)."""
    guard = guard_of(size)
    if req.cmd not in _WRITES:
        return
    offset, length = req.offset & _U64, req.length & _U32
    if offset + length <= size and offset + length > guard:
        req.offset = offset % max(guard // 2, 1) // 512 * 512
        req.length = min(length, guard - req.offset)


def write_reaches_witness(req: Request, size: int) -> bool:
    guard = guard_of(size)
    end = (req.offset & _U64) + (req.length & _U32)
    return (req.magic == p.REQUEST_MAGIC and req.cmd in _WRITES and end <= size
            and end > guard and req.length > 0)


# -- transmission: the framing model --------------------------------------------------------


@dataclass(frozen=True)
class RequestSent:
    request: Request


@dataclass(frozen=True)
class DiscSent:
    pass


TxEvent = RequestSent | DiscSent | Violation | Cut


def parse_requests(data: bytes) -> tuple[list[TxEvent], int]:
    """What the server sees in `data` during transmission, and how many bytes count."""
    events: list[TxEvent] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 28:
            events.append(Cut())
            return events, len(data)
        magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack_from(data, pos)
        pos += 28
        if magic != p.REQUEST_MAGIC:
            events.append(Violation(f"request magic {magic:#x}"))
            return events, pos
        if cmd == p.CMD_DISC:
            events.append(DiscSent())
            return events, pos
        payload = None
        if cmd == p.CMD_WRITE:
            if len(data) - pos < length:
                write = Request(magic, flags, cmd, cookie, offset, length)
                events.append(Cut(may_hang_up=length > MUST_ACCEPT, write=write))
                return events, len(data)
            payload = data[pos:pos + length]
            pos += length
        events.append(RequestSent(Request(magic, flags, cmd, cookie, offset, length, payload)))
    return events, pos


# -- a session ------------------------------------------------------------------------------


class Fuzzer:
    """Runs sessions against one server; thread-safe counters and findings."""

    def __init__(self, socket_path: str, targets: list[Target],
                 timeout: float = SESSION_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.targets = targets
        self.timeout = timeout
        self.lock = threading.Lock()
        self.sessions = 0
        self.outcomes: Counter[str] = Counter()
        self.findings: list[Finding] = []

    def session(self, seed: int) -> Finding | None:
        rng = random.Random(seed)
        try:
            peer = Peer(self.socket_path, self.timeout)
        except OSError as e:
            return self._record(seed, "refused", Finding("closed", f"connect: {e}", seed))
        try:
            outcome = self._run(rng, peer)
            return self._record(seed, outcome, None)
        except Hang as e:
            detail = f"{e}; {self._probe()}"
            return self._record(seed, "hang", Finding("hang", detail, seed, bytes(peer.sent)))
        except Closed as e:
            finding = Finding("closed", f"hung up where a reply was owed: {e}", seed,
                              bytes(peer.sent))
            return self._record(seed, "closed", finding)
        except Broken as e:
            return self._record(seed, e.kind, Finding(e.kind, str(e), seed, bytes(peer.sent)))
        except Exception as e:  # the fuzzer's own defect, or one it did not foresee: shown
            finding = Finding("fuzzer-error", repr(e), seed, bytes(peer.sent))
            return self._record(seed, "fuzzer-error", finding)
        finally:
            peer.close()

    def _probe(self) -> str:
        """Whether a fresh connection is served while one hangs: tells a stuck connection
        from a stuck server."""
        target = self.targets[0]
        try:
            with nbd_helpers.RawClient(self.socket_path, timeout=self.timeout) as client:
                client.handshake()
                client.go(target.name, structured=False)
                client.read(0, 512)
            return "a fresh connection is served meanwhile"
        except Exception as e:
            return f"a fresh connection is not served either ({type(e).__name__}): " \
                   "the whole server is stuck"

    def _record(self, seed: int, outcome: str, finding: Finding | None) -> Finding | None:
        with self.lock:
            self.sessions += 1
            self.outcomes[outcome] += 1
            if finding is not None:
                self.findings.append(finding)
        return finding

    def _run(self, rng: random.Random, peer: Peer) -> str:
        if rng.random() < 0.02:
            return "connect-only"
        magic, ihaveopt, hflags = struct.unpack(">QQH", peer.recv_exact(18))
        if (magic, ihaveopt) != (p.NBDMAGIC, p.IHAVEOPT) or hflags & ~3 or not hflags & 1:
            raise Broken("bad-reply", f"greeting {magic:#x} {ihaveopt:#x} {hflags:#x}")
        if rng.random() < 0.4:
            return self._transmission(rng, peer, self._valid_handshake(rng, peer))
        return self._fuzz_handshake(rng, peer)

    # -- handshake --

    def _valid_handshake(self, rng: random.Random, peer: Peer) -> Session:
        no_zeroes = rng.random() < 0.5
        flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)
        peer.send(p.CLIENT_FLAGS.pack(flags))
        target = rng.choice(self.targets)
        structured = rng.random() < 0.7
        meta = structured and rng.random() < 0.6
        if structured:
            self._option_exchange(peer, [_send_option(peer, p.OPT_STRUCTURED_REPLY, b"")])
        if meta:
            data = p.meta_context_request(target.name, [p.META_BASE_ALLOCATION])
            self._option_exchange(peer, [_send_option(peer, p.OPT_SET_META_CONTEXT, data)])
        if rng.random() < 0.8:
            data = p.info_request(target.name, [p.INFO_TYPE_BLOCK_SIZE])
            result = self._option_exchange(peer, [_send_option(peer, p.OPT_GO, data)])
        else:
            _send_option(peer, p.OPT_EXPORT_NAME, target.name.encode())
            result = self._export_name_reply(peer, no_zeroes)
        if not isinstance(result, tuple):
            raise Broken("wrong-answer", f"export {target.name!r} refused")
        size, tflags = result
        return Session(structured, meta, size, tflags)

    def _fuzz_handshake(self, rng: random.Random, peer: Peer) -> str:
        structured = no_zeroes = False
        need_flags = True
        for _ in range(rng.randint(1, 4)):
            parts = []
            if need_flags:
                parts.append(_client_flags(rng))
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                opt, data = _valid_option(rng, self.targets)
                if rng.random() < 0.35:
                    data = _mutate_data(rng, data)
                parts.append(_option_message(rng, opt, data))
                if opt in _TERMINAL:
                    break
            raw = b"".join(parts)
            if rng.random() < 0.1:
                raw = _flip_bytes(rng, raw, 0)
            events, used = parse_options(raw, need_flags)
            peer.send(raw[:used])
            if need_flags and isinstance(events[0], FlagsSent):
                no_zeroes = bool(events[0].flags & p.FLAG_C_NO_ZEROES)
            need_flags = False
            result = self._option_exchange(peer, events, no_zeroes)
            if isinstance(result, str):
                return result
            for event in events:  # what the server negotiated, for the transmission phase
                if isinstance(event, OptionSent) and event.option == p.OPT_STRUCTURED_REPLY:
                    structured = structured or not event.data
            if isinstance(result, tuple):
                size, tflags = result
                session = Session(structured, False, size, tflags)
                return "go+" + self._transmission(rng, peer, session)
        self._option_exchange(peer, [_send_option(peer, p.OPT_ABORT, b"")])
        return "options"

    def _option_exchange(self, peer: Peer, events: list[Event], no_zeroes: bool = False
                         ) -> tuple[int, int] | str | None:
        """Check the server's answers to `events` (already sent). Returns (size, tflags) when
        transmission began, why when the session is over (the server hung up as it had to,
        or the last message was incomplete), None to go on negotiating."""
        for event in events:
            if isinstance(event, FlagsSent):
                if event.flags & ~3 or not event.flags & 1:
                    peer.expect_eof()
                    return "bad-flags"
                continue
            if isinstance(event, Violation):
                peer.expect_eof()
                return "violation"
            if isinstance(event, Cut):
                return "cut"
            if event.option == p.OPT_EXPORT_NAME:
                export = self._export_name_reply(peer, no_zeroes)
                return "export-refused" if export is None else export
            result = self._option_replies(peer, event)
            if result is not None:
                return result
        return None

    def _export_name_reply(self, peer: Peer, no_zeroes: bool) -> tuple[int, int] | None:
        try:
            size, tflags = p.EXPORT_NAME_REPLY.unpack(peer.recv_exact(10))
        except Closed:
            return None  # refused: the only answer the spec allows
        if not no_zeroes and peer.recv_exact(124) != bytes(124):
            raise Broken("bad-reply", "EXPORT_NAME padding is not zeroes")
        self._check_export(size, tflags, "EXPORT_NAME")
        return size, tflags

    def _check_export(self, size: int, tflags: int, what: str) -> None:
        if not tflags & p.TFLAG_HAS_FLAGS:
            raise Broken("bad-reply", f"{what}: transmission flags {tflags:#x} lack HAS_FLAGS")
        if size not in {t.size for t in self.targets}:
            raise Broken("bad-reply", f"{what}: export size {size}")

    def _option_replies(self, peer: Peer, sent: OptionSent) -> tuple[int, int] | str | None:
        opt = sent.option
        info: tuple[int, int] | None = None
        while True:
            try:
                header = peer.recv_exact(20)
            except Closed:
                if opt == p.OPT_ABORT:
                    return "aborted"
                raise
            magic, r_opt, r_type, length = p.OPTION_REPLY.unpack(header)
            if magic != p.REPLY_MAGIC:
                raise Broken("bad-reply", f"option reply magic {magic:#x}")
            if r_opt != opt:
                raise Broken("bad-reply", f"reply for option {r_opt} to option {opt}")
            if length > 16 << 20:
                raise Broken("bad-reply", f"option reply of {length} bytes")
            data = peer.recv_exact(length)
            if r_type & p.REP_FLAG_ERROR:
                if opt == p.OPT_ABORT:
                    raise Broken("wrong-answer", "ABORT answered with an error")
                return None
            if r_type == p.REP_ACK:
                if opt == p.OPT_ABORT:
                    peer.expect_eof()
                    return "aborted"
                if opt == p.OPT_STARTTLS:
                    raise Broken("wrong-answer", "STARTTLS acknowledged without TLS")
                if opt == p.OPT_GO:
                    if info is None:
                        raise Broken("bad-reply", "GO acknowledged without INFO_EXPORT")
                    return info
                if opt not in (p.OPT_LIST, p.OPT_INFO, p.OPT_STRUCTURED_REPLY,
                               p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                    raise Broken("wrong-answer", f"unknown option {opt} acknowledged")
                if opt == p.OPT_STRUCTURED_REPLY and sent.data:
                    raise Broken("wrong-answer", "STRUCTURED_REPLY with data acknowledged")
                return None
            if opt == p.OPT_MINIDISK_CONTROL and r_type == p.REP_MINIDISK_RESULT:
                return None
            if opt not in _NON_FINAL_REPLIES.get(r_type, ()):
                raise Broken("bad-reply", f"reply type {r_type:#x} to option {opt}")
            if r_type == p.REP_INFO:
                info = self._check_info(data) or info

    def _check_info(self, data: bytes) -> tuple[int, int] | None:
        if len(data) < 2:
            raise Broken("bad-reply", f"REP_INFO of {len(data)} bytes")
        (info_type,) = struct.unpack_from(">H", data)
        if info_type == p.INFO_TYPE_EXPORT:
            if len(data) != 12:
                raise Broken("bad-reply", f"INFO_EXPORT of {len(data)} bytes")
            _, size, tflags = p.INFO_EXPORT.unpack(data)
            self._check_export(size, tflags, "INFO_EXPORT")
            return size, tflags
        if info_type == p.INFO_TYPE_BLOCK_SIZE:
            if len(data) != 14:
                raise Broken("bad-reply", f"INFO_BLOCK_SIZE of {len(data)} bytes")
            _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE.unpack(data)
            if not (minimum & (minimum - 1) == 0 and minimum <= 65536
                    and preferred >= max(minimum, 512) and maximum >= preferred):
                raise Broken("bad-reply", f"block sizes {minimum}/{preferred}/{maximum}")
        return None

    # -- transmission --

    def _transmission(self, rng: random.Random, peer: Peer, session: Session) -> str:
        cookies = iter(range(rng.choice([0, 1, _U64 - 1000]), 1 << 64))
        for _ in range(rng.randint(1, 6)):
            requests = [_request(rng, session, next(cookies))
                        for _ in range(rng.choice([1, 1, 2, 4, 8, 16]))]
            if rng.random() < 0.01:  # a WRITE over the 32 MiB a server should accept
                requests.append(Request(p.REQUEST_MAGIC, 0, p.CMD_WRITE, next(cookies),
                                        rng.choice([0, session.size]), BIG_WRITE,
                                        bytes(BIG_WRITE)))
            raw = _batch(rng, requests)
            valid = {r.cookie: r for r in requests if r.valid}
            if rng.random() < 0.1:
                raw = _cut_or_flip(rng, raw, session.size)
            events, used = parse_requests(raw)
            peer.send(raw[:used])
            ending = rng.random()
            if ending < 0.03:
                return "dropped"  # disconnect with replies outstanding
            if ending < 0.06:
                peer.sock.shutdown(socket.SHUT_WR)
                peer.expect_eof()
                return "half-closed"
            result = self._replies(peer, session, events, valid)
            if result != "ok":
                return result
        peer.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        peer.expect_eof()
        return "transmission"

    def _replies(self, peer: Peer, session: Session, events: list[TxEvent],
                 valid: dict[int, Request]) -> str:
        pending: dict[int, Request] = {}
        for event in events:
            if isinstance(event, RequestSent):
                sent = event.request
                if sent.cookie in pending:
                    return "ambiguous"  # two requests in flight with one cookie
                generated = valid.get(sent.cookie)
                sent.valid = generated is not None and (
                    sent.flags, sent.cmd, sent.offset, sent.length) == (
                    generated.flags, generated.cmd, generated.offset, generated.length)
                pending[sent.cookie] = sent
        end = events[-1] if events else None
        # Replies owed before a violation may be lost in the hang-up.
        optional = isinstance(end, Violation) or isinstance(end, Cut) and end.may_hang_up
        early = end.write if isinstance(end, Cut) else None  # may be refused before its payload
        chunks: dict[int, list[tuple[int, int, bytes]]] = {}
        while pending:
            try:
                (magic,) = struct.unpack(">I", peer.recv_exact(4))
            except Closed:
                if optional:
                    return "violation"
                raise
            if magic == p.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", peer.recv_exact(12))
                req = pending.pop(cookie, None)
                if req is None and early is not None and cookie == early.cookie:
                    if not error:
                        raise Broken("wrong-answer", f"WRITE {cookie} succeeded before its "
                                     "payload was sent")
                    self._judge(early, session, error, "")
                    early = None
                    continue
                if req is None:
                    raise Broken("bad-reply", f"simple reply for unknown cookie {cookie}")
                if req.cmd == p.CMD_READ and session.structured:
                    raise Broken("bad-reply", "simple reply to READ after STRUCTURED_REPLY")
                if req.cmd == p.CMD_READ and error == 0:
                    peer.recv_exact(req.length)
                self._judge(req, session, error, "")
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                flags, ctype, cookie, length = struct.unpack(">HHQI", peer.recv_exact(16))
                req = pending.get(cookie)
                if req is None or not session.structured:
                    raise Broken("bad-reply", f"chunk for cookie {cookie} "
                                 f"(structured={session.structured})")
                if length > req.length + 65536 and ctype != p.REPLY_TYPE_BLOCK_STATUS:
                    raise Broken("bad-reply", f"chunk of {length} bytes for {req}")
                chunks.setdefault(cookie, []).append((flags, ctype, peer.recv_exact(length)))
                if flags & p.REPLY_FLAG_DONE:
                    del pending[cookie]
                    self._judge_chunks(req, session, chunks.pop(cookie))
            else:
                raise Broken("bad-reply", f"reply magic {magic:#x}")
        if isinstance(end, (Violation, DiscSent)):
            peer.expect_eof()
            return "violation" if isinstance(end, Violation) else "disc"
        if isinstance(end, Cut):
            return "cut"
        return "ok"

    def _judge_chunks(self, req: Request, session: Session,
                      chunks: list[tuple[int, int, bytes]]) -> None:
        reply = nbd_helpers.Reply(req.cookie, chunks=[nbd_helpers.Chunk(*c) for c in chunks])
        error = 0
        message = ""
        for _, ctype, payload in chunks:
            if ctype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
                minimum = 6 if ctype == p.REPLY_TYPE_ERROR else 14
                if len(payload) < minimum:
                    raise Broken("bad-reply", f"error chunk of {len(payload)} bytes")
                error, msg_len = p.CHUNK_ERROR.unpack_from(payload)
                if 6 + msg_len + (minimum - 6) != len(payload):
                    raise Broken("bad-reply", f"error chunk message length {msg_len}")
                message = payload[6:6 + msg_len].decode(errors="replace")
        if error == 0:
            try:
                if req.cmd == p.CMD_READ:
                    nbd_helpers.read_data(reply, req.offset, req.length)
                elif req.cmd == p.CMD_BLOCK_STATUS:
                    self._check_extents(req, session, reply)
            except AssertionError as e:
                raise Broken("bad-reply", f"{p.CMD_NAMES.get(req.cmd)} chunks: {e}") from None
        self._judge(req, session, error, message)

    def _check_extents(self, req: Request, session: Session,
                       reply: nbd_helpers.Reply) -> None:
        ctx, extents = nbd_helpers.block_status(reply)
        assert extents, "no extents"
        assert all(length > 0 for length, _ in extents), "an extent of length 0"
        assert sum(length for length, _ in extents[:-1]) < req.length, "extents past request"
        if req.flags & p.CMD_FLAG_REQ_ONE:
            assert len(extents) == 1 and extents[0][0] <= req.length, "REQ_ONE broken"

    def _judge(self, req: Request, session: Session, error: int, message: str) -> None:
        """Errors that must not happen, and successes that must not either."""
        what = f"{p.CMD_NAMES.get(req.cmd, req.cmd)} flags={req.flags:#x} " \
               f"offset={req.offset} length={req.length}"
        if error and error not in KNOWN_ERRORS:
            raise Broken("bad-reply", f"{what}: error value {error}")
        if error == p.NBD_EIO:
            raise Broken("internal-error", f"{what}: EIO {message!r}")
        if error and _must_succeed(req, session):
            raise Broken("wrong-answer", f"{what}: a valid request failed with error "
                         f"{error} {message!r}")
        if error:
            return
        if req.cmd not in p.CMD_NAMES:
            raise Broken("wrong-answer", f"{what}: unknown command succeeded")
        if req.flags & ~p.KNOWN_CMD_FLAGS:
            raise Broken("wrong-answer", f"{what}: unknown flags succeeded")
        ranged = req.cmd not in (p.CMD_FLUSH, p.CMD_DISC)
        if ranged and req.offset + req.length > session.size:
            raise Broken("wrong-answer", f"{what}: past the end ({session.size}) succeeded")
        if req.cmd in _WRITES and session.tflags & p.TFLAG_READ_ONLY:
            raise Broken("wrong-answer", f"{what}: write to a read-only export succeeded")


def _must_succeed(req: Request, session: Session) -> bool:
    """A request as generated (untouched by mutations) that the export advertised."""
    if not req.valid:
        return False
    tflags = session.tflags
    need = {p.CMD_FLUSH: p.TFLAG_SEND_FLUSH, p.CMD_TRIM: p.TFLAG_SEND_TRIM,
            p.CMD_WRITE_ZEROES: p.TFLAG_SEND_WRITE_ZEROES, p.CMD_CACHE: p.TFLAG_SEND_CACHE
            }.get(req.cmd, 0)
    if need and not tflags & need:
        return False
    if req.flags & p.CMD_FLAG_FUA and not tflags & p.TFLAG_SEND_FUA:
        return False
    if req.flags & p.CMD_FLAG_FAST_ZERO:  # ENOTSUP is its answer when zeroing is slow
        return False
    return req.cmd != p.CMD_BLOCK_STATUS or session.meta


def _batch(rng: random.Random, requests: list[Request]) -> bytes:
    """The requests' bytes; a WRITE too large to send whole is sent in part and ends the
    batch (the server may wait for the rest of its payload, or refuse the length)."""
    parts = []
    for req in requests:
        parts.append(req.header())
        if req.has_payload:
            if req.payload is None:
                parts.append(rng.randbytes(rng.randrange(min(req.length, 1 << 16) + 1)))
                break
            parts.append(req.payload)
    return b"".join(parts)


def _cut_or_flip(rng: random.Random, raw: bytes, size: int) -> bytes:
    """Raw-byte damage, unless it would aim a valid write at the witness region."""
    if rng.random() < 0.5:
        return raw[:rng.randrange(len(raw))] if raw else raw
    flipped = _flip_bytes(rng, raw, 0)
    events, _ = parse_requests(flipped)
    if any(isinstance(e, RequestSent) and write_reaches_witness(e.request, size)
           for e in events):
        return raw
    return flipped


# -- the witness ----------------------------------------------------------------------------

_WITNESS = '''
import json, random, select, sys
import nbd

params = json.loads(sys.argv[1])
rng = random.Random(params["seed"])
BLOCK = params["block"]
handles = []
for t in params["targets"]:
    h = nbd.NBD()
    h.connect_uri(t["uri"])
    first = t["guard"] // BLOCK
    handles.append((t["name"], h, list(range(first, t["size"] // BLOCK)), {}))
ops = reads = 0
def report(error=None):
    print(json.dumps({"ops": ops, "reads": reads, "error": error}), flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    name, h, blocks, model = rng.choice(handles)
    block = rng.choice(blocks)
    try:
        if rng.random() < 0.5:
            data = rng.randbytes(BLOCK)
            h.pwrite(data, block * BLOCK)
            model[block] = data
        if rng.random() < 0.05:
            h.flush()
        got = h.pread(BLOCK, block * BLOCK)
    except nbd.Error as e:
        report(f"{name}: block {block}: {e}")
        sys.exit(1)
    ops += 1
    reads += 1
    want = model.setdefault(block, got)
    if got != want:
        report(f"{name}: block {block} reads back wrong data (op {ops})")
        sys.exit(1)
report()
'''


class Witness:
    """libnbd (in /usr/bin/python3) writing and verifying the targets' witness regions until
    stopped; it exits at once with an error if a read is wrong or a request fails."""

    def __init__(self, socket_path: str, targets: list[Target], seed: int) -> None:
        params = {"seed": seed, "block": BLOCK, "targets": [
            {"name": t.name, "uri": f"nbd+unix:///{t.name}?socket={socket_path}",
             "size": t.size, "guard": t.guard} for t in targets]}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", textwrap.dedent(_WITNESS), json.dumps(params)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def failed(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """The witness's result: {"ops", "reads", "error"} (error None when all was well)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {"ops": -1, "reads": -1, "error": f"witness stalled for {timeout} s"}
        lines = out.decode().strip().splitlines()
        if not lines:
            return {"ops": -1, "reads": -1,
                    "error": f"witness exited {self.proc.returncode}: {err.decode()[-2000:]}"}
        result: dict[str, Any] = json.loads(lines[-1])
        return result


# -- a campaign -----------------------------------------------------------------------------


def resources(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Report:
    seed: int
    seconds: float
    sessions: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    witness: dict[str, Any] = field(default_factory=dict)
    server_alive: bool = True
    rss_kib: tuple[int, int] = (0, 0)  # before, after
    fds: tuple[int, int] = (0, 0)

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.findings)
        lines = [
            f"seed {self.seed}: {self.sessions} sessions in {self.seconds:.1f} s "
            f"({self.sessions / max(self.seconds, 1e-9):.0f}/s); server "
            f"{'alive' if self.server_alive else 'DEAD'}",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common()),
            f"witness: {self.witness}",
            f"server RSS {self.rss_kib[0]} -> {self.rss_kib[1]} KiB, "
            f"fds {self.fds[0]} -> {self.fds[1]}",
            f"findings: {len(self.findings)} " + (str(dict(kinds)) if kinds else ""),
        ]
        seen: set[tuple[str, str]] = set()
        for f in self.findings:  # one line per distinct finding, the first seed for each
            key = (f.kind, f.detail.split(":")[0])
            if key not in seen:
                seen.add(key)
                lines.append("  " + f.describe())
        return "\n".join(lines)


def session_seeds(seed: int, worker: int) -> Iterator[int]:
    rng = random.Random(seed * 1009 + worker)
    while True:
        yield rng.getrandbits(63)


def run_campaign(socket_path: str, pid: int, targets: list[Target], seed: int,
                 seconds: float, workers: int = 3, timeout: float = SESSION_TIMEOUT,
                 max_findings: int = 50) -> Report:
    """Fuzz for `seconds` with `workers` concurrent sessions while a witness verifies I/O;
    then close everything and measure the server (RSS and fds, after the connections it
    had to close are gone)."""
    report = Report(seed, seconds)
    rss0, fds0 = resources(pid)
    witness = Witness(socket_path, targets, seed)
    fuzzer = Fuzzer(socket_path, targets, timeout)
    deadline = time.monotonic() + seconds
    stop = threading.Event()

    def work(worker: int) -> None:
        for session_seed in session_seeds(seed, worker):
            if stop.is_set() or time.monotonic() > deadline:
                return
            fuzzer.session(session_seed)
            if witness.failed() or len(fuzzer.findings) >= max_findings or not _alive(pid):
                stop.set()

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.seconds = time.monotonic() - started
        report.witness = witness.stop()
    finally:
        stop.set()
        witness.kill()
    report.server_alive = _alive(pid)
    report.sessions, report.outcomes = fuzzer.sessions, fuzzer.outcomes
    report.findings = fuzzer.findings
    if report.server_alive:
        settle = time.monotonic() + 10
        while resources(pid)[1] > fds0 and time.monotonic() < settle:
            time.sleep(0.1)  # the server closes what the fuzzer dropped on its next turn
        report.rss_kib, report.fds = (rss0, resources(pid)[0]), (fds0, resources(pid)[1])
    return report


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# -- the server under attack ----------------------------------------------------------------

EXPORT_SIZE = 16 << 20
CACHE_SIZE = 4 << 20  # the blk key's write-back cache (-r): small, so growth shows


def server_args(workdir: Path) -> tuple[list[str], list[Target]]:
    """`minidisk serve` options for a memory disk, a plain host file, a `blk` key (write-back
    cache) and a dm linear table over a host file, and the targets they export. The server
    may keep at most EXPORT_SIZE + CACHE_SIZE bytes of the data written to them."""
    for name in ("file.img", "blk.img", "lin.img"):
        with open(workdir / name, "wb") as f:
            f.truncate(EXPORT_SIZE)
    (workdir / "lin.table").write_text(f"0 {EXPORT_SIZE // 512} linear /lin-base 0\n")
    args = ["-r", str(CACHE_SIZE), "--memory", f"mem={EXPORT_SIZE}",
            "--file", f"file={workdir / 'file.img'}", "--file", f"lin-base={workdir / 'lin.img'}",
            "-d", f"key=/blk,hostpath={workdir / 'blk.img'},size={EXPORT_SIZE},type=blk",
            "--table", f"lin={workdir / 'lin.table'}"]
    names = ["mem", "file", "blk", "dev/mapper/lin"]
    return args, [Target(n, EXPORT_SIZE) for n in names]


def main(argv: list[str] | None = None) -> int:
    from tests import harness

    parser = argparse.ArgumentParser(
        prog="scripts/fuzz-nbd",
        description="Fuzz `minidisk serve` (memory, file, blk and dm linear exports) with "
                    "mutated NBD sessions while a libnbd witness verifies I/O; print the "
                    "findings, each with the session seed that replays it.")
    parser.add_argument("--seconds", type=float, default=600.0, help="default 600")
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--workers", type=int, default=3, help="concurrent sessions")
    parser.add_argument("--timeout", type=float, default=SESSION_TIMEOUT,
                        help="seconds without progress that make a hang")
    parser.add_argument("--session", type=int, default=None,
                        help="replay one session by its seed (printed with each finding)")
    args = parser.parse_args(argv)
    directory = harness.short_dir()
    try:
        serve_args, targets = server_args(directory)
        server = harness.serve(directory, *serve_args, name="fuzz", verbose=True)
        try:
            return _long_run(args, server.socket, server.proc.pid, targets, server.log_text)
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _long_run(args: argparse.Namespace, socket_path: str, pid: int, targets: list[Target],
              server_log: Callable[[], str]) -> int:
    if args.session is not None:
        finding = Fuzzer(socket_path, targets, args.timeout).session(args.session)
        print(finding.describe() if finding else f"session {args.session}: no finding")
        return 1 if finding else 0
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"fuzzing {socket_path} for {args.seconds} s, seed {seed}", flush=True)
    report = run_campaign(socket_path, pid, targets, seed, args.seconds, args.workers,
                          args.timeout, max_findings=1000)
    print(report.summary())
    if not report.server_alive:
        print(server_log()[-4000:])
    return 1 if report.findings or report.witness.get("error") or not report.server_alive else 0

if __name__ == "__main__":
    sys.exit(main())
