"""Fixtures for the lock manager: a `minidisk dlm serve` process on its own socket, and a
dlmfs mount on its own directory, both always torn down."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
MINIDISK = str(VENV_BIN / "minidisk")
HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "worker.py")


@dataclass
class Server:
    url: str
    path: str
    process: subprocess.Popen[str]


@dataclass
class Mount:
    path: Path
    server: Server
    process: subprocess.Popen[str]


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short directory of our own (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="dlm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def serving(path: str, *options: str) -> Iterator[Server]:
    """`minidisk dlm serve unix://PATH OPTIONS...` once it listens; stopped afterwards."""
    process = subprocess.Popen([MINIDISK, "dlm", "serve", f"unix://{path}", *options],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on"), line
        yield Server(f"unix://{path}", path, process)
    finally:
        _stop(process)


@pytest.fixture
def dlm_server(tmp_short: Path) -> Iterator[Server]:
    with serving(str(tmp_short / "dlm.sock")) as server:
        yield server


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


@pytest.fixture
def dlmfs(dlm_server: Server, tmp_short: Path) -> Iterator[Mount]:
    mnt = tmp_short / "mnt"
    mnt.mkdir()
    process = subprocess.Popen([MINIDISK, "dlmfs", str(mnt), "--server", dlm_server.url,
                                "--wait-limit", "2"], text=True)
    try:
        deadline = time.monotonic() + 15
        while not _mounted(mnt):
            assert process.poll() is None, "dlmfs exited before mounting"
            assert time.monotonic() < deadline, "dlmfs did not mount"
            time.sleep(0.05)
        yield Mount(mnt, dlm_server, process)
    finally:
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False,
                           stderr=subprocess.DEVNULL)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            _stop(process)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        _stop(process)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Client tests run on both loops: the daemon uses asyncio, dlmfs uses trio."""
    return str(request.param)
