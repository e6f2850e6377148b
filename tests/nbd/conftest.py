"""Fixtures for the NBD server tests: `minidisk -vv serve -s` subprocesses (tests/harness.py)
on unix sockets in short /tmp directories, always stopped at teardown."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.harness import Server, short_dir


def launch(directory: Path, args: list[str], name: str = "nbd") -> Server:
    """`minidisk -vv serve -s ARGS unix://DIR/NAME.sock`, once it accepts connections."""
    return harness.serve(directory, *args, name=name, verbose=True)


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
