"""Fixtures for the dm tests: host files with FileDevice windows.

Tests are plain functions that run their coroutine with `dm_helpers.run(...)`; every device
a fixture opens is closed at teardown. The helpers live in dm_helpers.py, importable
because this directory is put on sys.path (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import stop_process

from minidisk.device.file import FileDevice

sys.path.insert(0, str(Path(__file__).parent))

from dm_helpers import MINIDISK, Server, pattern  # noqa: E402


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
    """Start servers with the given `minidisk serve` options; stopped at teardown."""
    started: list[Server] = []

    def start(*options: str) -> Server:
        sock = short_tmp / f"s{len(started)}.sock"
        log = open(short_tmp / f"s{len(started)}.log", "wb")
        proc = subprocess.Popen([MINIDISK, "serve", "-s", *options, f"unix://{sock}"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        server = Server(proc, sock, short_tmp / f"s{len(started)}.log")
        started.append(server)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not start: {(short_tmp / f's{len(started) - 1}.log').read_text()}")
            time.sleep(0.05)
        return server

    yield start
    for server in started:
        stop_process(server.proc)
