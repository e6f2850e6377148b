"""Servers for daemon tests: `minidisk serve -s` subprocesses on private unix sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import MINIDISK, stop_process


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None = None,
                    timeout: float = 15.0) -> None:
    """Until the server at `path` accepts connections: the socket file exists from bind(),
    a moment before listen(), and a connect in between is refused (seen under load)."""
    deadline = time.monotonic() + timeout
    while not _accepts(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no socket at {path}")
        time.sleep(0.02)


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


Server = Callable[..., str]


@pytest.fixture
def serve(short_tmp: Path) -> Iterator[Server]:
    """serve(*args) starts `minidisk serve -s ARGS unix://SOCK` and returns the socket path."""
    procs: list[subprocess.Popen[bytes]] = []
    counter = iter(range(1000))

    def start(*args: str) -> str:
        sock = short_tmp / f"s{next(counter)}.sock"
        proc = subprocess.Popen([MINIDISK, "serve", "-s", *args, f"unix://{sock}"],
                                stderr=subprocess.PIPE)
        procs.append(proc)
        wait_for_socket(sock, proc)
        return str(sock)

    yield start
    for proc in procs:
        stop_process(proc)


def nbdinfo_json(uri: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def run_cli(*args: str, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MINIDISK, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=check)
