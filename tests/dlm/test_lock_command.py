"""`minidisk dlm lock DOMAIN NAME COMMAND`: flock(1) on the lock manager, and the progress
of a wait (issue 18 item 6): plain lines on a pipe, rich's display on a terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from tests.dlm.conftest import Server
from tests.harness import MINIDISK


def _lock(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MINIDISK, "dlm", "lock", "--server", server.url, *args],
                          capture_output=True, text=True, timeout=60)


def _holder(server: Server, seconds: float) -> subprocess.Popen[str]:
    """Holds EX on d/r for `seconds` once it prints "held"."""
    proc = subprocess.Popen([MINIDISK, "dlm", "lock", "--server", server.url, "d", "r", "--",
                             "sh", "-c", f"echo held; sleep {seconds}"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_runs_the_command_with_the_lock_and_its_token(dlm_server: Server) -> None:
    done = _lock(dlm_server, "d", "r", "sh", "-c", 'echo "$MINIDISK_LOCK_TOKEN"; exit 7')
    assert done.returncode == 7 and done.stdout.strip().isdigit(), done
    assert done.stderr == ""  # granted at once: no progress shown


def test_nonblock_and_timeout_fail_with_the_conflict_status(dlm_server: Server) -> None:
    holder = _holder(dlm_server, 30)
    try:
        refused = _lock(dlm_server, "-n", "d", "r", "true")
        assert (refused.returncode, refused.stderr) == (
            1, "minidisk: d/r: EX not grantable now\n")
        late = _lock(dlm_server, "-w", "0.3", "-E", "9", "-m", "pr", "d", "r", "true")
        assert (late.returncode, late.stderr) == (
            9, "minidisk: d/r: PR not granted within 0.3 s\n")
        bad = _lock(dlm_server, "-m", "zz", "d", "r", "true")
        assert bad.returncode == 2 and "--mode 'zz'" in bad.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_wait_past_a_second_shows_plain_lines_on_a_pipe(dlm_server: Server) -> None:
    holder = _holder(dlm_server, 2)
    started = time.monotonic()
    done = _lock(dlm_server, "d", "r", "echo", "mine")
    holder.wait()
    assert done.returncode == 0 and done.stdout == "mine\n", done
    assert time.monotonic() - started > 1
    lines = done.stderr.splitlines()
    assert lines[0] == "minidisk: waiting for EX on d/r", lines
    assert lines[-1].startswith("minidisk: waiting for EX on d/r: done after "), lines


def test_a_wait_on_a_terminal_is_drawn_by_rich(dlm_server: Server) -> None:
    holder = _holder(dlm_server, 2)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([MINIDISK, "dlm", "lock", "--server", dlm_server.url, "d", "r",
                                 "true"], stdin=follower, stdout=follower, stderr=follower,
                                env={**os.environ, "TERM": "xterm"})
        os.close(follower)
        screen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            try:
                chunk = os.read(leader, 4096) if ready else b""
            except OSError:  # EIO: the terminal's last writer has gone
                chunk = b""
            if not chunk:
                break
            screen += chunk
        assert proc.wait(30) == 0
    finally:
        os.close(leader)
        holder.wait()
    text = screen.decode(errors="replace")
    assert "waiting for EX on d/r" in text and "\x1b[" in text, text
    assert "done after" not in text  # the plain lines are for pipes
