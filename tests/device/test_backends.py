"""Backends through the device interface: memory sparseness, file windows and holes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minidisk.device.api import EXTENT_HOLE, EXTENT_ZERO, Extent
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.device.null import NullDevice, ZeroDevice
from minidisk.device.pages import PAGE

HOLE = EXTENT_HOLE | EXTENT_ZERO


def test_memory_reads_back_writes_and_reports_holes() -> None:
    dev = MemoryDevice(1 << 20)

    async def body() -> None:
        data = os.urandom(10_000)
        await dev.pwrite(memoryview(data), PAGE + 123)
        buf = bytearray(10_000)
        await dev.pread(memoryview(buf), PAGE + 123)
        assert buf == data
        ext = await dev.extents(0, 1 << 20)
        assert ext[0] == Extent(0, PAGE, HOLE)
        assert ext[1] == Extent(PAGE, PAGE, 0)  # 123..10123 inside one 32 KiB page
        assert ext[2].flags == HOLE and ext[2].offset + ext[2].length == 1 << 20
        await dev.zero(PAGE, PAGE)
        assert await dev.extents(0, 1 << 20) == [Extent(0, 1 << 20, HOLE)]
        assert dev.allocated == 0

    asyncio.run(body())


def test_memory_partial_trim_keeps_the_rest() -> None:
    dev = MemoryDevice(4 * PAGE)

    async def body() -> None:
        await dev.pwrite(memoryview(b"\xff" * (2 * PAGE)), 0)
        await dev.trim(100, PAGE)  # the middle of page 0 .. into page 1
        buf = bytearray(2 * PAGE)
        await dev.pread(memoryview(buf), 0)
        assert buf[:100] == b"\xff" * 100
        assert buf[100:PAGE + 100] == bytes(PAGE)
        assert buf[PAGE + 100:] == b"\xff" * (PAGE - 100)

    asyncio.run(body())


def test_terabyte_memory_disk_uses_only_what_is_written() -> None:
    # In a fresh interpreter, so the measurement is not polluted by other tests.
    code = """
import asyncio, resource
from minidisk.device.memory import MemoryDevice
dev = MemoryDevice(1 << 40)
chunk = memoryview(b"\\x5a" * (1 << 20))
async def fill():
    for i in range(100):
        await dev.pwrite(chunk, (i * 9973 << 20) % (1 << 40))
    ext = await dev.extents(0, 1 << 40)
    assert sum(e.length for e in ext if e.flags == 0) == 100 << 20, ext[:4]
def rss_kib():
    return int(open("/proc/self/statm").read().split()[1]) * 4
before = rss_kib()
asyncio.run(fill())
assert dev.allocated == 100 << 20
print(rss_kib() - before)
"""
    grown_kib = int(subprocess.run([sys.executable, "-c", code], check=True,
                                   capture_output=True, text=True).stdout)
    assert 95 * 1024 <= grown_kib < 120 * 1024, grown_kib


def test_file_window_maps_to_host_offsets(tmp_path: Path) -> None:
    host = tmp_path / "host.img"
    host.write_bytes(bytes(1 << 20))
    dev = FileDevice(str(host), offset=4096, length=65536)
    assert dev.size == 65536

    async def body() -> None:
        await dev.pwrite(memoryview(b"abc"), 10, fua=True)
        await dev.close()

    asyncio.run(body())
    assert host.read_bytes()[4096 + 10:4096 + 13] == b"abc"


def test_file_window_past_end_is_refused(tmp_path: Path) -> None:
    host = tmp_path / "small.img"
    host.write_bytes(bytes(4096))
    with pytest.raises(OSError) as e:
        FileDevice(str(host), offset=8192)
    assert e.value.errno == 22
    with pytest.raises(OSError):
        FileDevice(str(host), offset=1024, length=4096)


def test_file_extents_trim_and_zero(tmp_path: Path) -> None:
    host = tmp_path / "sparse.img"
    with open(host, "wb") as f:
        f.truncate(4 << 20)
    dev = FileDevice(str(host))

    async def body() -> None:
        assert await dev.extents(0, 4 << 20) == [Extent(0, 4 << 20, HOLE)]
        await dev.pwrite(memoryview(b"\1" * (1 << 20)), 1 << 20)
        await dev.flush()
        ext = await dev.extents(0, 4 << 20)
        assert Extent(1 << 20, 1 << 20, 0) in ext
        await dev.trim(1 << 20, 1 << 20)
        assert await dev.extents(0, 4 << 20) == [Extent(0, 4 << 20, HOLE)]
        await dev.pwrite(memoryview(b"\2" * 8192), 0)
        await dev.zero(0, 4096, may_trim=False)
        buf = bytearray(8192)
        await dev.pread(memoryview(buf), 0)
        assert buf == bytes(4096) + b"\2" * 4096
        await dev.close()

    asyncio.run(body())
    assert os.stat(host).st_blocks * 512 < 1 << 20


def test_null_and_zero_devices() -> None:
    null, zero = NullDevice(1 << 20), ZeroDevice(1 << 20)
    assert not null.caps.read_only and zero.caps.read_only

    async def body() -> None:
        await null.pwrite(memoryview(b"x" * 10), 0)
        buf = bytearray(b"y" * 10)
        await null.pread(memoryview(buf), 0)
        assert buf == bytes(10)

    asyncio.run(body())
