"""Fixtures for the namespace tests: patterned host files and a namespace that is always closed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from minidisk.device.api import BlockDevice
from minidisk.namespace import Namespace, hostpath

Pattern = Callable[..., bytes]


def make_pattern(length: int, seed: int = 0) -> bytes:
    """Bytes where every 8-byte word holds its own offset (xor seed): misplaced data shows."""
    words = (length + 7) // 8
    return b"".join(((i * 8) ^ seed).to_bytes(8, "little") for i in range(words))[:length]


@pytest.fixture
def pattern() -> Pattern:
    """pattern(length, seed=0): see make_pattern."""
    return make_pattern


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    """make_file(name, size, seed=1): a host file filled with `pattern`."""

    def make(name: str, size: int, seed: int = 1) -> Path:
        path = tmp_path / name
        path.write_bytes(make_pattern(size, seed))
        return path

    return make


@pytest.fixture
def run() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    return asyncio.run


@pytest.fixture
def ns() -> Iterator[Namespace]:
    """A namespace closed (devices flushed and file descriptors released) after the test."""
    namespace = Namespace()
    yield namespace
    asyncio.run(namespace.aclose())


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """umask(mask): set the process umask for the test; the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with openat2 and once with the per-component openat walk (the
    fallback where the kernel has no openat2)."""
    if request.param == "openat2":
        if not hostpath.openat2_available():
            pytest.skip("this kernel has no openat2")
    else:
        monkeypatch.setattr(hostpath, "_openat2_works", False)
    return str(request.param)


async def read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await device.pread(memoryview(buf), offset)
    return bytes(buf)


async def write(device: BlockDevice, offset: int, data: bytes) -> None:
    await device.pwrite(memoryview(data), offset)


def file_at(path: Path, offset: int, length: int) -> bytes:
    """`length` bytes of the host file `path` at `offset`, read past any cache."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)
