"""Servers for daemon tests: `minidisk serve -s` subprocesses (tests/harness.py) on private
unix sockets, and the CLI as a user runs it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests import harness

# For test files that still import these from here (tests.harness is their home).
from tests.harness import nbdinfo_json as nbdinfo_json
from tests.harness import run_cli as run_cli


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None = None,
                    timeout: float = 15.0) -> None:
    """Until the server at `path` accepts connections (harness.accepts), for a test that
    starts its server by hand; tests.harness.serve and start wait by themselves."""
    deadline = time.monotonic() + harness.scaled(timeout)
    while not harness.accepts(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no socket at {path}")
        time.sleep(0.02)


Server = Callable[..., str]


@pytest.fixture
def serve(short_tmp: Path) -> Iterator[Server]:
    """serve(*args) starts `minidisk serve -s ARGS unix://SOCK` and returns the socket path."""
    servers: list[harness.Server] = []

    def start(*args: str) -> str:
        server = harness.serve(short_tmp, *args, name=f"s{len(servers)}")
        servers.append(server)
        return server.socket

    yield start
    for server in servers:
        server.stop()
