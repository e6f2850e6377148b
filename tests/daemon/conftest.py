"""Servers for daemon tests: `minidisk serve -s` subprocesses (tests/harness.py) on private
unix sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests import harness

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
