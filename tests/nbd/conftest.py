"""Fixtures for the NBD server tests: `minidisk serve -s` subprocesses on unix sockets in
short /tmp directories, always stopped at teardown, and the helpers in nbd_helpers.py
(importable because this directory is put on sys.path; pytest runs with importlib mode).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

MINIDISK = str(Path(sys.executable).parent / "minidisk")
START_TIMEOUT = 20.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    directory: Path
    socket: str
    log: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def uri(self, name: str = "", scheme: str = "nbd+unix", query: str = "") -> str:
        extra = f"&{query}" if query else ""
        return f"{scheme}:///{name}?socket={self.socket}{extra}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def launch(directory: Path, args: list[str], name: str = "nbd") -> Server:
    """`minidisk -vv serve -s ARGS unix://DIR/NAME.sock`, once it accepts connections."""
    sock = str(directory / f"{name}.sock")
    log = directory / f"{name}.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([MINIDISK, "-vv", "serve", "-s", *args, f"unix://{sock}"],
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    server = Server(proc, directory, sock, log)
    deadline = time.monotonic() + START_TIMEOUT
    while not (os.path.exists(sock) and _connectable(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server did not start: {args}\n{server.log_text()}")
        time.sleep(0.02)
    return server


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mdn-", dir="/tmp"))


StartServer = Callable[..., Server]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """`start_server(*serve_args, name="nbd")`: a fresh server for this test."""
    directory = short_dir()
    servers: list[Server] = []

    def start(*args: str, name: str = "nbd") -> Server:
        server = launch(directory, list(args or ("--memory", "disk=64M")), name)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _module_server(args: list[str]) -> Iterator[Server]:
    directory = short_dir()
    server = launch(directory, args)
    yield server
    alive = server.alive()
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)
    assert alive, "the shared server died during the module's tests"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One writable server per module: exports `disk` (64 MiB, default) and `small` (1 MiB).
    Tests that share it write to their own regions."""
    yield from _module_server(["--memory", "disk=64M", "--memory", "small=1M"])


@pytest.fixture(scope="module")
def ro_server() -> Iterator[Server]:
    """A --read-only server with one 1 MiB memory export `disk`."""
    yield from _module_server(["--read-only", "--memory", "disk=1M"])
