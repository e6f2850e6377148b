"""`serve --nbd` over a hostile remote (issue 10 item 11), end to end: a read through our
server gets an error, and `minidisk halt` and SIGTERM still stop the server."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.harness import MINIDISK
from tests.nbd.hostile_server import HostileServer, Replier, Request, good, simple

from minidisk.nbd import protocol as p

# A bound on every wait, so that a regression fails instead of hanging; not a timing claim.
HANG_GUARD = 20.0

pytestmark = pytest.mark.timeout(180)


def _read_fails(cookie_offset: int) -> Replier:
    """READs answered for a cookie that is not pending; everything else answered well."""
    def reply(r: Request) -> bytes | None:
        return simple(r.cookie + cookie_offset) if r.cmd == p.CMD_READ else good(r)
    return reply


def _stall(r: Request) -> bytes | None:
    return None


Outer = tuple[Path, list[harness.Server]]


@pytest.fixture
def outer(short_tmp: Path) -> Iterator[Outer]:
    servers: list[harness.Server] = []
    yield short_tmp, servers
    for server in servers:
        server.stop()


def _serve(short_tmp: Path, servers: list[harness.Server], remote: HostileServer
           ) -> tuple[subprocess.Popen[bytes], Path]:
    """The outer server, exporting `remote` as /remote; its log is short_tmp/outer.log."""
    server = harness.serve(short_tmp, "--nbd", f"/remote={remote.uri}&timeout=2", name="outer")
    servers.append(server)
    return server.proc, Path(server.socket)


def _qemu_read(sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read 0 4k",
                             f"nbd+unix:///remote?socket={sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _exits(proc: subprocess.Popen[bytes]) -> bool:
    try:
        proc.wait(HANG_GUARD)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_bad_remote_reply_is_an_error_and_halt_stops(outer: Outer) -> None:
    short_tmp, procs = outer
    with HostileServer(short_tmp / "remote.sock", _read_fails(1000)) as remote:
        proc, sock = _serve(short_tmp, procs, remote)
        reader = _qemu_read(sock)
        out, _ = reader.communicate(timeout=HANG_GUARD)
        assert "read failed" in out, out
        halted = subprocess.run([MINIDISK, "halt", f"unix://{sock}"], capture_output=True,
                                text=True, timeout=HANG_GUARD)
        # The remote cannot be flushed any more (its connection ended): said, not hung on.
        assert halted.returncode == 1 and "not flushed: /remote" in halted.stderr, halted
        assert _exits(proc), "the server is still running after halt"
    assert "protocol error" in (short_tmp / "outer.log").read_text()


def test_stalled_remote_times_out_and_sigterm_stops(outer: Outer) -> None:
    short_tmp, procs = outer
    with HostileServer(short_tmp / "remote.sock", _stall) as remote:
        proc, sock = _serve(short_tmp, procs, remote)
        reader = _qemu_read(sock)
        deadline = time.monotonic() + HANG_GUARD
        while not remote.requests:  # the read reached the remote, and waits there
            assert time.monotonic() < deadline and reader.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert _exits(proc), "the server is still running after SIGTERM"
        out, _ = reader.communicate(timeout=HANG_GUARD)
        assert "read failed" in out, out
