"""The harness itself (tests/harness.py): a process is ready only when its check says so, one
that exits or never gets ready is stopped and its log quoted, and a stop always reaps, with
SIGKILL for a process that ignores SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests import harness

# A unix-socket server in a few lines: says something, listens after `delay`, serves forever.
LISTENER = textwrap.dedent("""
    import signal, socket, sys, time
    if sys.argv[3] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("starting", flush=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    time.sleep(float(sys.argv[2]))  # bound but not listening: a connect is refused
    s.listen()
    while True:
        s.accept()[0].close()
""")


def listener(directory: Path, delay: float = 0.0, term: str = "default") -> list[str]:
    return [sys.executable, "-c", LISTENER, str(directory / "l.sock"), str(delay), term]


def started_in(directory: Path) -> list[harness.Process]:
    """The live processes logging into `directory` (a test's own)."""
    return [p for p in harness.live() if p.log.parent == directory]


def test_ready_means_accepting_not_bound(short_tmp: Path) -> None:
    sock = short_tmp / "l.sock"
    process = harness.start(listener(short_tmp, delay=0.3), short_tmp / "l.log",
                            harness.accepting(sock))
    try:
        assert harness.accepts(sock)
        assert process in harness.live()
        assert process.log_text() == "starting\n"  # its stdout went to the log
    finally:
        status = process.stop()
    assert status == -15  # SIGTERM, which it did not catch
    assert process not in harness.live()


def test_a_process_that_exits_is_reported_with_its_log(short_tmp: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('no such disk', file=sys.stderr); "
                                  "sys.exit(3)"]
    with pytest.raises(harness.DidNotStart, match=r"exited with 3\nno such disk"):
        harness.start(argv, short_tmp / "x.log", lambda _: False)
    assert not started_in(short_tmp)


def test_one_never_ready_is_stopped_at_its_bound(short_tmp: Path) -> None:
    with pytest.raises(harness.DidNotStart, match="not ready in 0.2 s") as info:
        harness.start(listener(short_tmp), short_tmp / "l.log", lambda _: False, timeout=0.2)
    assert "starting" in str(info.value)
    assert not started_in(short_tmp)


def test_stop_kills_what_ignores_sigterm_and_reaps_it(short_tmp: Path) -> None:
    sock = short_tmp / "l.sock"
    process = harness.start(listener(short_tmp, term="ignore-term"), short_tmp / "l.log",
                            harness.accepting(sock))
    assert process.stop(timeout=0.5) == -9
    with pytest.raises(ChildProcessError):  # reaped: no zombie left to wait for
        os.waitpid(process.pid, os.WNOHANG)


def test_serve_runs_minidisk_on_a_short_socket(short_tmp: Path) -> None:
    server = harness.serve(short_tmp, "--memory", "d=1M", name="m", verbose=True)
    try:
        assert server.socket == str(short_tmp / "m.sock") and len(server.socket) < 108
        info = harness.nbdinfo_json(server.uri("d"))
        assert info["exports"][0]["export-size"] == 1 << 20
    finally:
        assert server.stop() == 0  # SIGTERM is minidisk's clean shutdown
    assert "serving d" in server.log_text()


def test_stop_all_ends_what_no_fixture_stopped(short_tmp: Path) -> None:
    sock = short_tmp / "l.sock"
    process = harness.start(listener(short_tmp), short_tmp / "l.log", harness.accepting(sock))
    harness.stop_all()
    assert not process.alive() and not started_in(short_tmp)
    assert subprocess.run(["kill", "-0", str(process.pid)], capture_output=True).returncode == 1
