"""Servers for daemon tests: `minidisk serve -s` subprocesses (tests/harness.py) on private
unix sockets, and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests import harness
from tests.harness import MINIDISK


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


def nbdinfo_json(uri: str) -> dict[str, Any]:
    out = subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True)
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def run_cli(*args: str, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MINIDISK, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, check=check)
