"""The tests' one harness: where the CLI is, short directories for unix sockets, and the
processes tests start (a minidisk server, a lock manager, a user object that serves).

A process is started with its output in a log file and returned once it is ready (for a
server: a connect to its unix socket succeeds); it is stopped with SIGTERM, SIGKILL after a
bound, and always reaped. While it runs, a failing test shows the tail of its log
(tests/conftest.py's report hook reads `live()`), and whatever a test left running is
stopped when the session ends.
"""

from __future__ import annotations

import json
import os
import socket as _socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MINIDISK = str(VENV_BIN / "minidisk")
SYSTEM_PYTHON = "/usr/bin/python3"  # the only interpreter with libnbd's `nbd` module
# Every bound a test waits for is multiplied by this: 1 here; a TCG guest, where Python runs
# ~20x slower, sets MINIDISK_TEST_TIME_SCALE (tests/vm/test_autofs_guest.py).
TIME_SCALE = float(os.environ.get("MINIDISK_TEST_TIME_SCALE", "1"))
START_TIMEOUT = 20.0  # seconds until a started process is ready (scaled)
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL = 4000  # characters of a log shown with a failure
PROBE_CLOSE = 2.0  # seconds a readiness probe waits for the server to hang up on it


def scaled(seconds: float) -> float:
    """A wait bound of `seconds` on this machine, as long as it must be where tests run."""
    return seconds * TIME_SCALE


def need_root() -> None:
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root")


def run_cli(*args: str, env: Mapping[str, str] | None = None, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`minidisk ARGS` as a user runs it, its output captured as text."""
    return subprocess.run([MINIDISK, *args], capture_output=True, text=True,
                          timeout=scaled(timeout), env={**os.environ, **(env or {})},
                          check=check)


def nbdinfo_json(uri: str) -> dict[str, Any]:
    """What libnbd's nbdinfo says about `uri` (--json)."""
    out = subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True,
                         timeout=scaled(60))
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def short_dir(prefix: str = "md-") -> Path:
    """A new directory under /tmp, which the caller removes: a unix socket's path holds at
    most 107 bytes (sun_path), and pytest's tmp_path, named after the test, is often longer.
    The `short_tmp` fixture (tests/conftest.py) is one that is removed at teardown."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str],
                 timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM a process a test started, wait up to `timeout` for it, then SIGKILL it; it is
    reaped either way. Its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def accepts(path: str | Path) -> bool:
    """Whether a server accepts connections on the unix socket `path`. The socket file exists
    from bind(), a moment before listen(): a connect in between is refused (seen under load),
    so only a connect says the server is ready. Then it waits (up to PROBE_CLOSE) until the
    server has hung up on the probe's EOF: a test that counts the server's descriptors or
    clients right after the start must not count the probe."""
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_CLOSE)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        try:
            probe.shutdown(_socket.SHUT_WR)
            while probe.recv(4096):  # an NBD server's greeting, then its close
                pass
        except OSError:  # reset, or still open after PROBE_CLOSE: it accepted all the same
            pass
    return True


class DidNotStart(RuntimeError):
    """A process exited, or was not ready within its bound; the message has its log."""


@dataclass(eq=False)
class Process:
    """A process a test started, its stdout and stderr in `log`."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, SIGKILL after `timeout`; reaped. Its exit status."""
        try:
            return stop_process(self.proc, timeout)
        finally:
            _discard(self)

    def kill(self) -> int:
        """SIGKILL, reaped (a crash, not a shutdown). Its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        _discard(self)
        return self.proc.returncode


@dataclass(eq=False)
class Server(Process):
    """A server listening on the unix socket `socket`."""

    socket: str

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def uri(self, name: str = "", scheme: str = "nbd+unix", query: str = "") -> str:
        """The NBD URI of export `name` (libnbd's syntax: the path after the first slash)."""
        extra = f"&{query}" if query else ""
        return f"{scheme}:///{name}?socket={self.socket}{extra}"


_LIVE: list[Process] = []


def live() -> list[Process]:
    """The processes started here that nobody has stopped yet, oldest first."""
    return [p for p in _LIVE if p.alive()]


def _discard(process: Process) -> None:
    # By the process, not the object: a caller may wrap a Server in a class of its own.
    _LIVE[:] = [p for p in _LIVE if p.proc is not process.proc]


def stop_all() -> None:
    """Stop whatever a test left running (the session's end calls this)."""
    for process in reversed(list(_LIVE)):
        process.stop()


def start(argv: Sequence[str], log: Path, ready: Callable[[Process], bool], *,
          env: Mapping[str, str] | None = None, append: bool = False,
          new_session: bool = False, timeout: float = START_TIMEOUT) -> Process:
    """Run `argv` with stdin from /dev/null and stdout and stderr in `log` (appended to with
    `append`, for a process restarted on the same files; in a session of its own with
    `new_session`); return it once `ready(process)`. If it exits first, or `scaled(timeout)`
    passes, it is stopped and DidNotStart raised."""
    proc = _popen(argv, log, env, append, new_session)
    return _started(Process(proc, log), argv, ready, timeout)


def mount_dlmfs(mnt: Path, server_url: str, *options: str, log: Path,
                timeout: float = 15) -> Process:
    """`minidisk dlmfs -f MNT --server URL OPTIONS...` (its output in `log`), once MNT is a
    mount point; `unmount_fuse` takes it down."""
    return start([MINIDISK, "dlmfs", "-f", str(mnt), "--server", server_url, *options], log,
                 lambda process: os.path.ismount(mnt), timeout=timeout)


def unmount_fuse(mnt: Path, process: Process, timeout: float = 5) -> None:
    """Unmount a FUSE file system that `process` serves in the foreground and reap it: it
    exits by itself once unmounted; if it has not within `timeout`, the mount is detached
    lazily and the process stopped."""
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, stderr=subprocess.DEVNULL)
    try:
        process.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    process.stop()


def accepting(path: str | Path) -> Callable[[Process], bool]:
    """A `ready` for start(): a connect to the unix socket `path` succeeds."""
    return lambda process: accepts(path)


def serve(directory: Path, *args: str, name: str = "s", verbose: bool = False,
          env: Mapping[str, str] | None = None, append: bool = False,
          timeout: float = START_TIMEOUT) -> Server:
    """`minidisk [-vv] serve -s ARGS unix://DIRECTORY/NAME.sock`, its log DIRECTORY/NAME.log,
    once it accepts connections."""
    sock = str(directory / f"{name}.sock")
    log = directory / f"{name}.log"
    argv = [MINIDISK, *(["-vv"] if verbose else []), "serve", "-s", *args, f"unix://{sock}"]
    server = Server(_popen(argv, log, env, append, False), log, sock)
    return _started(server, argv, accepting(sock), timeout)


def _popen(argv: Sequence[str], log: Path, env: Mapping[str, str] | None, append: bool,
           new_session: bool) -> subprocess.Popen[bytes]:
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=None if env is None else dict(env),
                                start_new_session=new_session)


P = TypeVar("P", bound=Process)


def _started(process: P, argv: Sequence[str], ready: Callable[[Process], bool],
             timeout: float) -> P:
    _LIVE.append(process)
    deadline = time.monotonic() + scaled(timeout)
    pause = 0.001  # doubling up to 5 ms: a poll costs ~50 us, a late start the whole wait
    while not ready(process):
        exited = not process.alive()
        if exited or time.monotonic() > deadline:
            status = process.stop()
            why = f"exited with {status}" if exited else f"not ready in {scaled(timeout)} s"
            raise DidNotStart(f"{' '.join(argv)}: {why}\n{process.log_text()[-LOG_TAIL:]}")
        time.sleep(pause)
        pause = min(2 * pause, 0.005)
    return process
