"""The NBD clients against a hostile server (issue 10 item 11): the asyncio client behind
`serve --nbd`, the blocking handshake for kernel attach, and the control client.

Every bad reply must give the caller an error within the request timeout, fail every other
pending request, close the connection, and leave nothing that `close()` waits on for ever.
"""

from __future__ import annotations

import asyncio
import errno
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from tests.nbd.hostile_server import (
    CONTEXT_ID,
    HostileServer,
    OptionMangler,
    Replier,
    Request,
    chunk,
    data_chunk,
    good,
    option_reply,
    simple,
)

from minidisk.control_client import ControlError
from minidisk.kernel.errors import AttachError
from minidisk.kernel.handshake import connect as kernel_connect
from minidisk.kernel.uri import parse_nbd_uri
from minidisk.nbd import protocol as p
from minidisk.nbd.client import RemoteDevice

# Bounds on every wait, so that a regression fails instead of hanging; not timing claims.
HANG_GUARD = 20.0
REQUEST_TIMEOUT = 2  # the client's own timeout, given in the URI

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


@pytest.fixture
def sock_path(short_tmp: Path) -> Path:
    return short_tmp / "hostile.sock"


Hostile = Callable[..., HostileServer]


@pytest.fixture
def hostile(sock_path: Path) -> Iterator[Hostile]:
    """hostile(reply=..., option=..., greet=...) starts one server on a private socket."""
    started: list[HostileServer] = []

    def start(reply: Replier = good, option: OptionMangler | None = None,
              greet: bool = True) -> HostileServer:
        server = HostileServer(sock_path, reply, option, greet)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


async def _settled(aw: Awaitable[T]) -> T | BaseException:
    """The result or exception of `aw`; a test failure if it is still pending after the guard."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait([task], timeout=HANG_GUARD)
    if not done:
        task.cancel()
        pytest.fail(f"still waiting after {HANG_GUARD} s")
    exc = task.exception()
    return exc if exc is not None else task.result()


def _uri(server: HostileServer) -> str:
    return f"{server.uri}&timeout={REQUEST_TIMEOUT}"


def _stall_flush(hostile_read: Replier) -> Replier:
    """A server that never answers FLUSH, and answers READ and BLOCK_STATUS with `hostile_read`:
    the FLUSH pending when the bad reply comes must fail too."""
    def reply(request: Request) -> bytes | None:
        if request.cmd == p.CMD_FLUSH:
            return None
        if request.cmd in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            return hostile_read(request)
        return simple(request.cookie)
    return reply


OFFSET, LENGTH = 8192, 4096

READ_ATTACKS: dict[str, Replier] = {
    "unknown cookie": lambda r: simple(r.cookie + 1000),
    "second reply for a finished cookie": lambda r: good(r) + good(r),
    "chunk past the requested range": lambda r: data_chunk(r.cookie, r.offset + r.length,
                                                          bytes(512)),
    "chunk before the requested range": lambda r: data_chunk(r.cookie, r.offset - 512,
                                                            bytes(1024)),
    "overlapping chunks": lambda r: (data_chunk(r.cookie, r.offset, bytes(2048), done=False)
                                     + data_chunk(r.cookie, r.offset + 1024, bytes(3072))),
    "huge chunk length": lambda r: chunk(r.cookie, 1, struct.pack(">Q", r.offset) + bytes(1 << 20),
                                         length=0xFFFFFFF0),
    "garbage magic": lambda r: b"\xde\xad\xbe\xef" * 8,
    "simple reply to a structured read": lambda r: simple(r.cookie, 0, bytes(r.length)),
    "hole of size zero": lambda r: chunk(r.cookie, 2, struct.pack(">QI", r.offset, 0)),
    "hole past the range": lambda r: chunk(r.cookie, 2, struct.pack(">QI", r.offset, 1 << 30)),
    "error message past its chunk": lambda r: chunk(r.cookie, 0x8001,
                                                    struct.pack(">IH", 5, 100) + b"x"),
    "error chunk too short": lambda r: chunk(r.cookie, 0x8001, b"\0\0"),
    "unknown chunk flags": lambda r: chunk(r.cookie, 1, struct.pack(">Q", r.offset)
                                           + bytes(r.length), flags=0x40),
    "NONE chunk with a payload": lambda r: chunk(r.cookie, 0, b"abcd"),
    "block status chunk for a read": lambda r: chunk(r.cookie, 5, struct.pack(
        ">III", CONTEXT_ID, r.length, 0)),
    "unknown non-error chunk type": lambda r: chunk(r.cookie, 77, b""),
}

ANSWERED_FIRST = {"second reply for a finished cookie"}

EXTENTS_ATTACKS: dict[str, Replier] = {
    "descriptor of length zero": lambda r: chunk(r.cookie, 5, struct.pack(
        ">IIIII", CONTEXT_ID, 0, 0, 512, 0)),
    "no descriptors": lambda r: chunk(r.cookie, 5, struct.pack(">I", CONTEXT_ID)),
    "unknown context id": lambda r: chunk(r.cookie, 5, struct.pack(
        ">III", CONTEXT_ID + 1, r.length, 0)),
    "descriptors past the requested range": lambda r: chunk(r.cookie, 5, struct.pack(
        ">IIIII", CONTEXT_ID, r.length, 0, 512, 0)),
    "half a descriptor": lambda r: chunk(r.cookie, 5, struct.pack(">III", CONTEXT_ID,
                                                                  r.length, 0) + b"\0\0"),
    "huge block status length": lambda r: chunk(r.cookie, 5, struct.pack(">I", CONTEXT_ID),
                                                length=0xFFFFFFF0),
    "data chunk for block status": lambda r: data_chunk(r.cookie, r.offset, bytes(512)),
    "simple reply to block status": lambda r: simple(r.cookie),
}


async def _attacked(server: HostileServer, request: str, attacked_first_succeeds: bool = False
                    ) -> tuple[BaseException | None, BaseException]:
    """Connect, start a FLUSH (never answered), then the attacked request; both outcomes.
    With `attacked_first_succeeds`, the attacked request gets a good reply before the bad
    bytes, and only the FLUSH must fail."""
    dev = await RemoteDevice.connect(_uri(server))
    try:
        flush = asyncio.ensure_future(dev.flush())
        await asyncio.sleep(0)  # the FLUSH is sent first
        attacked: BaseException | None  # the attacked request's exception; None: it succeeded
        if request == "read":
            attacked = await _settled(dev.pread(memoryview(bytearray(LENGTH)), OFFSET))
        else:
            extents = await _settled(dev.extents(OFFSET, LENGTH))
            attacked = extents if isinstance(extents, BaseException) else None
        pending = await _settled(flush)
        assert isinstance(pending, BaseException), pending
        assert isinstance(attacked, BaseException) or attacked_first_succeeds, attacked
        # The connection is gone: a new request fails at once, it is not sent.
        after = await _settled(dev.pread(memoryview(bytearray(512)), 0))
        assert isinstance(after, OSError), after
        return attacked, pending
    finally:
        closed = await _settled(dev.close())
        assert closed is None, closed


def _check_protocol_error(attacked: BaseException | None, pending: BaseException,
                          server: HostileServer) -> None:
    for exc in (attacked, pending):
        if exc is None:  # answered well before the bad reply came
            continue
        assert isinstance(exc, OSError), repr(exc)
        assert exc.errno == errno.EIO, exc
        assert server.path in str(exc), exc  # it names the server
    assert server.hung_up.wait(HANG_GUARD), "the client kept the connection open"


@pytest.mark.parametrize("attack", list(READ_ATTACKS))
def test_bad_read_reply_fails_every_pending_request(hostile: Hostile,
                                                    attack: str) -> None:
    server = hostile(_stall_flush(READ_ATTACKS[attack]))
    attacked, pending = asyncio.run(_attacked(server, "read", attack in ANSWERED_FIRST))
    _check_protocol_error(attacked, pending, server)


@pytest.mark.parametrize("attack", list(EXTENTS_ATTACKS))
def test_bad_block_status_reply_fails_every_pending_request(hostile: Hostile,
                                                            attack: str) -> None:
    server = hostile(_stall_flush(EXTENTS_ATTACKS[attack]))
    attacked, pending = asyncio.run(_attacked(server, "extents"))
    _check_protocol_error(attacked, pending, server)


def test_stalled_server_times_out(hostile: Hostile) -> None:
    server = hostile(lambda r: None)
    attacked, pending = asyncio.run(_attacked(server, "read"))
    for exc in (attacked, pending):
        assert isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT, repr(exc)
        assert server.path in str(exc), exc
    assert server.hung_up.wait(HANG_GUARD)


def test_header_then_silence_times_out(hostile: Hostile) -> None:
    """A chunk header whose payload never comes: the reader is stuck mid-reply."""
    server = hostile(_stall_flush(lambda r: chunk(r.cookie, 1, b"", length=8 + r.length)))
    attacked, _ = asyncio.run(_attacked(server, "read"))
    assert isinstance(attacked, OSError) and attacked.errno == errno.ETIMEDOUT, repr(attacked)


def test_good_server_still_works(hostile: Hostile) -> None:
    """The checks refuse nothing a correct server sends (chunks in any order, holes)."""
    def reply(r: Request) -> bytes:
        if r.cmd != p.CMD_READ:
            return good(r)
        half = r.length // 2
        return (chunk(r.cookie, 2, struct.pack(">QI", r.offset + half, half), done=False)
                + data_chunk(r.cookie, r.offset, b"\x11" * half, done=False)
                + chunk(r.cookie, 0, b""))
    server = hostile(reply)

    async def body() -> None:
        dev = await RemoteDevice.connect(_uri(server))
        try:
            buf = bytearray(b"\xff" * LENGTH)
            holes = await dev.pread_sparse(memoryview(buf), OFFSET)
            assert buf == b"\x11" * (LENGTH // 2) + bytes(LENGTH // 2)
            assert holes == [(OFFSET + LENGTH // 2, LENGTH // 2)]
            extents = await dev.extents(0, 1 << 20)
            assert [(e.offset, e.length) for e in extents] == [(0, 1 << 20)]
            await dev.flush()
        finally:
            await dev.close()
    asyncio.run(body())


# -- the handshake ----------------------------------------------------------------------------

def _go(replies: bytes) -> OptionMangler:
    return lambda option, data: replies if option == p.OPT_GO else None


INFO_EXPORT = struct.pack(">HQH", 0, 1 << 20, p.TFLAG_HAS_FLAGS)
HANDSHAKE_ATTACKS = {
    "4 GiB option reply": (struct.pack(">QIII", 0x3E889045565A9, p.OPT_GO, p.REP_INFO,
                                       0xFFFFFFFF) + bytes(1 << 16), "bytes"),
    "endless INFO replies": (option_reply(p.OPT_GO, p.REP_INFO, struct.pack(">H", 1) + b"x" * 100)
                             * 5000, "replies"),
    "INFO_EXPORT of the wrong length": (option_reply(p.OPT_GO, p.REP_INFO, INFO_EXPORT + b"\0")
                                        + option_reply(p.OPT_GO, p.REP_ACK), "INFO"),
    "block size not a power of two": (option_reply(p.OPT_GO, p.REP_INFO, INFO_EXPORT)
                                      + option_reply(p.OPT_GO, p.REP_INFO, struct.pack(
                                          ">HIII", 3, 512, 3000, 1 << 20))
                                      + option_reply(p.OPT_GO, p.REP_ACK), "block size"),
    "GO acknowledged without INFO_EXPORT": (option_reply(p.OPT_GO, p.REP_ACK), "INFO_EXPORT"),
    "unexpected reply type": (option_reply(p.OPT_GO, p.REP_SERVER, b"\0\0\0\0"), "reply"),
}


@pytest.mark.parametrize("attack", list(HANDSHAKE_ATTACKS))
def test_bad_handshake_reply_is_an_error(hostile: Hostile, attack: str) -> None:
    replies, word = HANDSHAKE_ATTACKS[attack]
    server = hostile(option=_go(replies))
    outcome = asyncio.run(_settled(RemoteDevice.connect(_uri(server))))
    assert isinstance(outcome, OSError), repr(outcome)
    assert word.lower() in str(outcome).lower() and server.path in str(outcome), outcome


def test_silent_server_handshake_times_out(hostile: Hostile) -> None:
    server = hostile(greet=False)
    outcome = asyncio.run(_settled(RemoteDevice.connect(_uri(server))))
    assert isinstance(outcome, OSError) and outcome.errno == errno.ETIMEDOUT, repr(outcome)


# The kernel attach handshake and the control client are blocking, and allocate what the
# server announces; run them with an address-space limit so that a 4 GiB allocation fails
# as MemoryError (and the test with it) instead of swapping the machine.
_LIMITED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    kind, target = sys.argv[1], sys.argv[2]
    try:
        if kind == "kernel":
            from minidisk.kernel.errors import AttachError
            from minidisk.kernel.handshake import connect
            from minidisk.kernel.uri import parse_nbd_uri
            try:
                connect(parse_nbd_uri(target), timeout=5)
            except AttachError as e:
                print("ERROR", e)
        else:
            from minidisk import control_client
            try:
                control_client.call(target, "exports", timeout=5)
            except control_client.ControlError as e:
                print("ERROR", e.errno, e)
    except MemoryError:
        print("MemoryError")
""")


def _limited(kind: str, target: str) -> str:
    done = subprocess.run([sys.executable, "-c", _LIMITED, kind, target], capture_output=True,
                          text=True, timeout=HANG_GUARD)
    return done.stdout + done.stderr


@pytest.mark.parametrize("attack", list(HANDSHAKE_ATTACKS))
def test_kernel_handshake_refuses_bad_replies(hostile: Hostile, attack: str) -> None:
    replies, word = HANDSHAKE_ATTACKS[attack]
    server = hostile(option=_go(replies))
    out = _limited("kernel", server.uri)
    assert out.startswith("ERROR") and word.lower() in out.lower(), out


def test_kernel_handshake_with_a_silent_server_times_out(hostile: Hostile) -> None:
    server = hostile(greet=False)
    with pytest.raises(AttachError, match="timed out"):
        kernel_connect(parse_nbd_uri(server.uri), timeout=1)


def test_kernel_handshake_takes_the_uris_timeout(hostile: Hostile) -> None:
    """?timeout= bounds the attach handshake too (else 30 s, past the guard)."""
    server = hostile(greet=False)
    started = time.monotonic()
    with pytest.raises(AttachError, match="timed out"):
        kernel_connect(parse_nbd_uri(f"{server.uri}&timeout=1"))
    assert time.monotonic() - started < HANG_GUARD


def test_remote_export_over_vsock_is_refused() -> None:
    with pytest.raises(ValueError, match="tcp or a unix socket"):
        asyncio.run(RemoteDevice.connect("nbd+vsock://3/x"))


# -- the control client -----------------------------------------------------------------------

def _control(data: bytes, reply: int = p.REP_MINIDISK_RESULT) -> OptionMangler:
    return lambda option, _: (option_reply(option, reply, data)
                              if option == p.OPT_MINIDISK_CONTROL else None)


CONTROL_ATTACKS: dict[str, tuple[OptionMangler, str]] = {
    "not JSON": (_control(b"\xff garbage"), "JSON"),
    "JSON but not an object": (_control(b"[1, 2]"), "object"),
    "errno not a number": (_control(b'{"ok": false, "errno": "x", "error": "e"}'), "errno"),
    "result not an object": (_control(b'{"ok": true, "result": 5}'), "result"),
    "deeply nested": (_control(b"[" * 30000 + b"]" * 30000), "JSON"),
    "reply to another option": (lambda option, _: option_reply(p.OPT_GO, p.REP_ACK)
                                if option == p.OPT_MINIDISK_CONTROL else None, "option"),
    "4 GiB reply": (lambda option, _: struct.pack(">QIII", 0x3E889045565A9, option,
                                                  p.REP_MINIDISK_RESULT, 0xFFFFFFFF)
                    + bytes(1 << 16) if option == p.OPT_MINIDISK_CONTROL else None, "bytes"),
    "silence": (lambda option, _: b"" if option == p.OPT_MINIDISK_CONTROL else None,
                "no reply"),
}


@pytest.mark.parametrize("attack", list(CONTROL_ATTACKS))
def test_control_client_refuses_bad_replies(hostile: Hostile, attack: str) -> None:
    mangler, word = CONTROL_ATTACKS[attack]
    server = hostile(option=mangler)
    out = _limited("control", f"unix://{server.path}")
    assert out.startswith("ERROR") and word.lower() in out.lower(), out
    assert server.path in out, out  # it names the server


def test_control_cli_says_one_line(hostile: Hostile) -> None:
    server = hostile(option=_control(b"\xff garbage"))
    from tests.harness import run_cli
    done = run_cli("halt", f"unix://{server.path}")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert ControlError.__name__ not in done.stderr and "Traceback" not in done.stderr
