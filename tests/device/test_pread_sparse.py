"""`pread_sparse`: one pass that reads data and reports holes, for every layer that has one.

The reference is the two-pass answer (`extents`, then `pread` of the data): the holes must be
exactly the zero extents, and every data byte must be what `pread` returns.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest
from tests import harness

from minidisk.device.api import EXTENT_ZERO, BlockDevice
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.device.pages import PAGE
from minidisk.device.revocable import RevocableDevice
from minidisk.dm.devices import DeviceDict
from minidisk.dm.registry import Registry
from minidisk.nbd.client import RemoteDevice

SIZE = 64 * PAGE


async def _scatter(dev: BlockDevice, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(12):
        offset = rng.randrange(0, dev.size - 3 * PAGE)
        await dev.pwrite(memoryview(os.urandom(rng.randrange(1, 3 * PAGE))), offset)


async def _check(dev: BlockDevice, offset: int, length: int) -> None:
    buf = bytearray(b"\xaa" * length)
    holes = await dev.pread_sparse(memoryview(buf), offset)
    expected = [(e.offset, e.length) for e in await dev.extents(offset, length)
                if e.flags & EXTENT_ZERO]
    # Extents may be split differently; compare the covered byte ranges.
    assert _cover(holes) == _cover(expected), (offset, length, holes, expected)
    assert holes == sorted(holes) and all(offset <= s and s + n <= offset + length
                                          for s, n in holes)
    reference = bytearray(length)
    await dev.pread(memoryview(reference), offset)
    in_hole = _cover(holes)
    for i in range(length):
        if offset + i in in_hole:
            assert reference[i] == 0
            assert buf[i] in (0xAA, 0)  # unspecified: untouched or zeroed
        else:
            assert buf[i] == reference[i]


def _cover(ranges: list[tuple[int, int]]) -> set[int]:
    return {b for s, n in ranges for b in range(s, s + n)}


def _ranges(size: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(0, size), (PAGE - 7, 3 * PAGE + 11)]
    for _ in range(6):
        offset = rng.randrange(0, size - 1)
        out.append((offset, rng.randrange(1, min(size - offset, 6 * PAGE) + 1)))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_memory_one_pass_matches_extents(seed: int) -> None:
    async def body() -> None:
        dev = MemoryDevice(SIZE)
        await _scatter(dev, seed)
        for offset, length in _ranges(SIZE, seed):
            await _check(dev, offset, length)

    asyncio.run(body())


def test_default_two_pass_on_a_sparse_file(tmp_path: Path) -> None:
    host = tmp_path / "sparse.img"
    with open(host, "wb") as f:
        f.truncate(SIZE)

    async def body() -> None:
        dev = FileDevice(str(host))
        await _scatter(dev, 7)
        await dev.flush()
        for offset, length in _ranges(SIZE, 7):
            await _check(dev, offset, length)
        await dev.close()

    asyncio.run(body())


@pytest.mark.parametrize("table", [
    "0 {s} linear /a 0",
    "0 {h} linear /a {h}\n{h} {h} linear /b 0",
    "0 {s} striped 2 16 /a 0 /b 0",
    "0 {s} striped 4 8 /a 0 /b 0 /c 0 /d 0",
])
def test_dm_layers_match_extents(table: str) -> None:
    sectors = SIZE // 512

    async def body() -> None:
        children: dict[str, BlockDevice] = {
            key: RevocableDevice(MemoryDevice(SIZE)) for key in ("/a", "/b", "/c", "/d")}
        for i, child in enumerate(children.values()):
            await _scatter(child, i)
        registry = Registry(source=DeviceDict(children))
        await registry.create("t", table.format(s=sectors, h=sectors // 2))
        dev = registry.get("t")
        small = [(k * 4096 + 100, 1000) for k in range(0, dev.size // 4096, 7)]  # one chunk
        for offset, length in _ranges(dev.size, 11) + small:
            await _check(dev, offset, length)

    asyncio.run(body())


def test_remote_device_learns_holes_from_one_structured_read(short_tmp: Path) -> None:
    """A remote export's holes arrive as OFFSET_HOLE chunks of the READ itself (from a
    minidisk upstream, which sends them; nbdkit's memory plugin sends one data chunk)."""
    upstream = harness.serve(short_tmp, "--memory", f"d={SIZE}", name="up")
    try:
        async def body() -> None:
            dev = await RemoteDevice.connect(upstream.uri("d"))
            try:
                await _scatter(dev, 3)
                for offset, length in _ranges(SIZE, 3):
                    await _check(dev, offset, length)
            finally:
                await dev.close()

        asyncio.run(body())
    finally:
        upstream.stop()
