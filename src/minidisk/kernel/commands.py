"""Running external tools and tracking helper processes that outlive us."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from minidisk.kernel.errors import CommandError

log = logging.getLogger(__name__)


def run(argv: Sequence[str], *, timeout: float = 120.0,
        ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; a failure raises CommandError carrying its stderr."""
    log.debug("running %s", " ".join(argv))
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"timed out after {timeout:g} s") from None
    if done.returncode not in ok_codes:
        raise CommandError(argv, done.returncode, done.stderr or done.stdout)
    return done


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate()` until it is true or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass(frozen=True)
class Helper:
    """A process we started that must outlive the attach command.

    The pid alone is not an identity once we have exited (pids are reused), so the kernel's
    start time from /proc/PID/stat is kept with it and checked before every signal.
    """

    name: str
    pid: int
    start_time: int

    @classmethod
    def of(cls, name: str, pid: int) -> Helper:
        start = _start_time(pid)
        if start is None:
            raise ProcessLookupError(pid)
        return cls(name, pid, start)

    def alive(self) -> bool:
        # Reap it if it is our own child (a long-lived caller of attach()), else a zombie
        # would linger; for anyone else's process this raises ChildProcessError.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)
        return _start_time(self.pid) == self.start_time

    def stop(self, grace: float) -> None:
        """Wait `grace` seconds for a clean exit, then SIGTERM, then SIGKILL."""
        if wait_until(lambda: not self.alive(), grace):
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not self.alive():
                return
            log.warning("%s (pid %d) did not exit; sending %s", self.name, self.pid, sig.name)
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if wait_until(lambda: not self.alive(), wait):
                return
        raise TimeoutError(f"{self.name} (pid {self.pid}) survived SIGKILL")


def _start_time(pid: int) -> int | None:
    """Start time in clock ticks, or None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])
