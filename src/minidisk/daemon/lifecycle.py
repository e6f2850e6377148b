"""Process lifecycle of a server: detaching, readiness, and signals.

`minidisk serve` detaches by default, as rump_server does: the parent exits 0 once the
child accepts connections, or non-zero with the child's error message, so a script can
rely on the server being reachable the moment the command returns. The readiness report
travels over a pipe: the child writes "ok" (then the lines the parent is to print: the client
URIs of --print-uri) or "error: ..." and closes it.

Under systemd (Type=notify) readiness is also told to $NOTIFY_SOCKET, as sd_notify(3) does.

A detached server without --log-file logs to syslog. Also here: the pid file (nbdkit's -P:
written once the server serves, removed at exit if it is still ours) and --exit-with-parent
(the kernel's parent-death signal, prctl(2)).
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1
SYSLOG_ENV = "MINIDISK_SYSLOG_SOCKET"  # where syslog listens, if not /dev/log (tests)


class Readiness:
    """The child's end of the readiness pipe (a no-op in the foreground)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def _write(self, text: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, text.encode())
        finally:
            os.close(self.fd)
            self.fd = None

    def ready(self, lines: Sequence[str] = ()) -> None:
        self._write("\n".join(["ok", *lines]))

    def failed(self, message: str) -> None:
        self._write("error: " + message)


def detach(run: Callable[[Readiness], int], log_file: str | None,
           command: str = "minidisk serve") -> int:
    """Fork; the child runs `run` in a new session; the parent waits for readiness and
    returns 0 once the child is ready, or prints the child's one-line reason (prefixed with
    `command`) and returns its exit status."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if log_file:
            log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        else:
            os.dup2(devnull, 2)
            log_to_syslog()
        os.close(devnull)
        code = 1
        try:
            code = run(Readiness(write_fd))
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    os.close(read_fd)
    report = b"".join(chunks).decode(errors="replace")
    if report == "ok" or report.startswith("ok\n"):
        for line in report.splitlines()[1:]:
            print(line, flush=True)
        return 0
    _, status = os.waitpid(pid, 0)
    message = report.removeprefix("error: ") or "exited during start-up"
    print(f"{command}: {message}", file=sys.stderr)
    return os.waitstatus_to_exitcode(status) or 1


def log_to_syslog() -> None:
    """A detached server without --log-file logs to syslog (journald reads /dev/log too), as
    daemons do; where nothing listens there, logging stays as it was (to /dev/null)."""
    path = os.environ.get(SYSLOG_ENV, "/dev/log")
    try:
        handler = logging.handlers.SysLogHandler(
            address=path, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return
    handler.setFormatter(logging.Formatter(
        "minidisk[%(process)d]: %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers[:] = [handler]


def write_pid_file(path: str) -> None:
    """Our pid in `path`, replaced atomically so a reader never sees a partial file."""
    partial = f"{path}.{os.getpid()}.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(partial, path)


def remove_pid_file(path: str) -> None:
    """Remove `path` if it still names us (a second server may have written its own)."""
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def exit_with_parent(parent: int) -> None:
    """SIGTERM when `parent` (the pid that started us) exits; if it is already gone (it may
    have exited before the prctl), SIGTERM now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"--exit-with-parent: prctl: {os.strerror(err)}")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def notify_systemd(state: str) -> None:
    """sd_notify(3): send `state` (e.g. "READY=1") to $NOTIFY_SOCKET if systemd set it; an
    abstract socket is written with a leading '@'."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:  # a server that serves must not die of its supervisor's socket
        logging.getLogger(__name__).warning("NOTIFY_SOCKET %s: %s", path, e.strerror or e)
