"""Fixtures for the dm tests: host files with FileDevice windows, and servers.

Tests are plain functions that run their coroutine with `dm_helpers.run(...)`; every device
a fixture opens is closed at teardown.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.dm.dm_helpers import Server, pattern
from tests.dm.dm_helpers import serve as serve_dm

from minidisk.device.file import FileDevice


@pytest.fixture
def host_file(tmp_path: Path) -> Callable[[str, int], Path]:
    """Make a host file of `size` bytes of seeded random data (so nothing reads as zero)."""
    def make(name: str, size: int) -> Path:
        path = tmp_path / name
        path.write_bytes(pattern(zlib.crc32(name.encode()), size))
        return path
    return make


@pytest.fixture
def file_devices() -> Iterator[Callable[..., FileDevice]]:
    """Open FileDevice windows that are closed at teardown."""
    opened: list[FileDevice] = []

    def open_window(path: Path, offset: int = 0, length: int | None = None) -> FileDevice:
        dev = FileDevice(str(path), offset, length)
        opened.append(dev)
        return dev

    yield open_window
    for dev in opened:
        if dev.fd >= 0:
            os.close(dev.fd)
            dev.fd = -1


@pytest.fixture
def serve(short_tmp: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with the given `minidisk serve` options (sN.sock, log sN.log); stopped
    at teardown."""
    started: list[Server] = []

    def start(*options: str) -> Server:
        started.append(serve_dm(short_tmp, *options, name=f"s{len(started)}"))
        return started[-1]

    yield start
    for server in started:
        server.stop()
