"""Hostile bodies on the control channel (issue 10 item 9), sent as the private NBD option
over raw sockets: every one gets a JSON error naming what is wrong, or a hang-up, and none
keeps a connection half-done (so `minidisk halt` is not held by it)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.harness import MINIDISK, run_cli

from minidisk.nbd import protocol as p

# A bound on every wait, so that a regression fails instead of hanging; not a timing claim.
HANG_GUARD = 20.0

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(short_tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A server with one memory export; its log is short_tmp/c.log."""
    started = harness.serve(short_tmp, "--memory", "m=1M", name="c")
    try:
        yield started.proc, Path(started.socket)
    finally:
        started.stop()


def _open_control(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(HANG_GUARD)
    s.connect(str(sock))
    greeting = _recv(s, p.GREETING.size)
    assert greeting is not None
    magic, opt_magic, _ = p.GREETING.unpack(greeting)
    assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
    s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    return s


def _recv(s: socket.socket, n: int) -> bytes | None:
    """n bytes, or None when the server hung up first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _answer(s: socket.socket, declared: int, body: bytes) -> dict[str, object] | None:
    """Send one control option declaring `declared` bytes; the JSON reply, or None for a
    hang-up. A server that does neither within the guard fails the test (recv times out)."""
    try:
        s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_MINIDISK_CONTROL, declared) + body)
    except (BrokenPipeError, ConnectionResetError):
        return None
    header = _recv(s, p.OPTION_REPLY.size)
    if header is None:
        return None
    magic, option, reply, length = p.OPTION_REPLY.unpack(header)
    assert (magic, option, reply) == (p.REPLY_MAGIC, p.OPT_MINIDISK_CONTROL,
                                      p.REP_MINIDISK_RESULT)
    assert length < 1 << 16
    data = _recv(s, length)
    assert data is not None
    message = json.loads(data)
    assert isinstance(message, dict)
    return message


# Deep enough for the JSON decoder's recursion limit, small enough for the option limit.
DEEP = b'{"command": "exports", "args": {"a": ' + b"[" * 30000 + b"]" * 30000 + b"}}"

BODIES = {
    "command is a list": (b'{"command": []}', "command"),
    "command is an object": (b'{"command": {"x": 1}}', "command"),
    "command is a number": (b'{"command": 5}', "command"),
    "body is a list": (b"[]", "object"),
    "body is a string": (b'"halt"', "object"),
    "no command": (b'{"args": {}}', "command"),
    "args not an object": (b'{"command": "exports", "args": [1]}', "args"),
    "nested 30000 deep": (b"[" * 30000 + b"]" * 30000, "nested"),
    "nested args": (DEEP, "nested"),
    "not UTF-8": (b'{"command": "\xff\xfe"}', "UTF-8"),
    "a 5000-digit number": (b'{"command": "exports", "args": {"n": ' + b"9" * 5000 + b"}}",
                            "malformed"),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_hostile_control_body_gets_an_error_reply(
        server: tuple[subprocess.Popen[bytes], Path], name: str) -> None:
    proc, sock = server
    body, word = BODIES[name]
    with _open_control(sock) as s:
        message = _answer(s, len(body), body)
        assert message is not None, "the server hung up instead of answering"
        assert message["ok"] is False and message["errno"] == 22, message
        assert word.lower() in str(message["error"]).lower(), message
        # The connection is not left half-done: the next command on it is answered.
        after = _answer(s, len(b'{"command": "exports"}'), b'{"command": "exports"}')
        assert after is not None and after["ok"] is True, after


def test_huge_length_header_is_hung_up_on(server: tuple[subprocess.Popen[bytes], Path]
                                          ) -> None:
    proc, sock = server
    with _open_control(sock) as s:
        assert _answer(s, 100 << 20, b"{") is None


def test_nested_100000_deep_gets_an_error_or_a_hang_up(
        server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = server
    body = b'{"command": "exports", "args": {"a": ' + b"[" * 100000 + b"]" * 100000 + b"}}"
    with _open_control(sock) as s:
        message = _answer(s, len(body), body)
        # 200 kB, past MAX_OPTION_DATA: hung up on before the JSON is looked at.
        assert len(body) > p.MAX_OPTION_DATA and message is None, message


def test_halt_finishes_with_hostile_control_connections_open(
        server: tuple[subprocess.Popen[bytes], Path], short_tmp: Path) -> None:
    """Every hostile body sent, each on its own connection left open, then halt: the server
    exits at once instead of waiting its shutdown timeout for connections stuck mid-option."""
    proc, sock = server
    held = []
    try:
        for body, _ in BODIES.values():
            s = _open_control(sock)
            held.append(s)
            s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_MINIDISK_CONTROL, len(body)) + body)
        for s in held:  # each answered (or hung up on) before halt is asked
            assert _recv(s, p.OPTION_REPLY.size) is not None
        halted = subprocess.run([MINIDISK, "halt", f"unix://{sock}"], capture_output=True,
                                text=True, timeout=HANG_GUARD)
        assert halted.returncode == 0, halted.stderr
        proc.wait(HANG_GUARD)
    finally:
        for s in held:
            s.close()
    assert "still busy" not in (short_tmp / "c.log").read_text()
    assert run_cli("halt", f"unix://{sock}").returncode == 1  # it is gone
