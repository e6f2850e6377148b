"""The blk write-back cache: coherence against a model, write-back points, the memory bound."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from minidisk.device.file import FileDevice
from minidisk.namespace import Namespace
from minidisk.namespace.blockcache import LINE, BlockCache, CacheMemory

Run = Callable[..., object]
SIZE = 40 * LINE + 3 * 512  # the last line is short


async def read(device: BlockCache, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await device.pread(memoryview(buf), offset)
    return bytes(buf)


def random_range(rng: random.Random, size: int) -> tuple[int, int]:
    """A sector-aligned range, biased to cross line boundaries and hit the last line."""
    sectors = size // 512
    length = rng.choice([1, 2, 8, 127, 128, 129, 300, 1000])
    start = rng.randrange(0, sectors)
    if rng.random() < 0.3:
        start = max(0, sectors - length)
    length = min(length, sectors - start)
    return start * 512, max(1, length) * 512


@pytest.mark.parametrize("seed", range(6))
def test_two_caches_match_a_model_under_a_tiny_budget(tmp_path: Path, run: Run,
                                                      seed: int) -> None:
    """Random I/O on two caches sharing a 5-line budget: reads always match the model, the
    host files match it after every flush, and the budget is never exceeded."""
    rng = random.Random(seed)
    memory = CacheMemory(5 * LINE)
    paths = [tmp_path / "a.img", tmp_path / "b.img"]
    models = [bytearray(rng.randbytes(SIZE)) for _ in paths]
    for path, model in zip(paths, models, strict=True):
        path.write_bytes(model)

    async def scenario() -> None:
        caches = [BlockCache(FileDevice(str(p)), memory) for p in paths]
        for step in range(400):
            i = rng.randrange(2)
            cache, model, path = caches[i], models[i], paths[i]
            op = rng.choice(["read", "read", "write", "write", "write", "fua", "flush", "trim",
                             "zero", "concurrent"])
            offset, length = random_range(rng, SIZE)
            if op == "read":
                assert await read(cache, offset, length) == model[offset:offset + length], step
            elif op in ("write", "fua"):
                data = rng.randbytes(length)
                await cache.pwrite(memoryview(data), offset, fua=op == "fua")
                model[offset:offset + length] = data
                if op == "fua":
                    with path.open("rb") as f:
                        f.seek(offset)
                        assert f.read(length) == data, step
            elif op == "flush":
                await cache.flush()
                assert path.read_bytes() == model, step
            elif op in ("trim", "zero"):
                await (cache.trim(offset, length) if op == "trim" else cache.zero(offset, length))
                model[offset:offset + length] = bytes(length)
            else:  # overlapping requests at once: the lock must keep them coherent
                data = rng.randbytes(length)
                results = await asyncio.gather(
                    read(cache, offset, length),
                    cache.pwrite(memoryview(data), offset),
                    read(cache, offset, length))
                assert results[0] == model[offset:offset + length], step
                assert results[2] == data, step
                model[offset:offset + length] = data
            assert memory.allocated <= memory.limit
        for cache, path, model in zip(caches, paths, models, strict=True):
            await cache.close()
            assert path.read_bytes() == model
        assert not memory._clean

    run(scenario())


def test_write_back_points(tmp_path: Path, run: Run) -> None:
    host = tmp_path / "h.img"
    host.write_bytes(bytes(4 * LINE))

    async def scenario() -> None:
        cache = BlockCache(FileDevice(str(host)), CacheMemory(16 * LINE))
        await cache.pwrite(memoryview(b"A" * 512), 0)
        assert host.read_bytes()[:1] == b"\0"  # write-back: acknowledged, not yet written
        assert await read(cache, 0, 512) == b"A" * 512
        await cache.flush()
        assert host.read_bytes()[:512] == b"A" * 512
        await cache.pwrite(memoryview(b"B" * 512), LINE, fua=True)
        assert host.read_bytes()[LINE:LINE + 512] == b"B" * 512  # FUA: through at once
        await cache.pwrite(memoryview(b"C" * 512), 2 * LINE)
        extents = await cache.extents(0, 4 * LINE)  # the dirty line is data, not written
        assert host.read_bytes()[2 * LINE:2 * LINE + 512] == bytes(512)
        assert sum(e.length for e in extents) == 4 * LINE
        assert [e.flags for e in extents if e.offset <= 2 * LINE < e.offset + e.length] == [0]
        await cache.pwrite(memoryview(b"D" * 512), 3 * LINE)
        await cache.close()  # halt and remove: written back
        assert host.read_bytes()[3 * LINE:3 * LINE + 512] == b"D" * 512

    run(scenario())


def test_budget_all_dirty_elsewhere_means_write_through(tmp_path: Path, run: Run) -> None:
    """A cache never waits for another cache's dirty lines: it bypasses the cache instead."""
    memory = CacheMemory(2 * LINE)
    (tmp_path / "a.img").write_bytes(bytes(4 * LINE))
    (tmp_path / "b.img").write_bytes(bytes(4 * LINE))

    async def scenario() -> None:
        a = BlockCache(FileDevice(str(tmp_path / "a.img")), memory)
        b = BlockCache(FileDevice(str(tmp_path / "b.img")), memory)
        await a.pwrite(memoryview(b"a" * LINE * 2), 0)  # the whole budget, dirty
        assert len(a.dirty) == 2
        await b.pwrite(memoryview(b"b" * 512), 0)
        assert (tmp_path / "b.img").read_bytes()[:512] == b"b" * 512  # written through
        assert not b.lines and len(a.dirty) == 2
        await a.pwrite(memoryview(b"x" * 512), 3 * LINE)  # a writes back its own to make room
        assert (tmp_path / "a.img").read_bytes()[:2 * LINE] == b"a" * 2 * LINE
        assert memory.allocated <= memory.limit
        await a.close()
        await b.close()

    run(scenario())


def test_set_limit_shrinks_the_pool(tmp_path: Path, run: Run) -> None:
    (tmp_path / "a.img").write_bytes(bytes(8 * LINE))
    memory = CacheMemory(8 * LINE)

    async def scenario() -> None:
        cache = BlockCache(FileDevice(str(tmp_path / "a.img")), memory)
        await read(cache, 0, 8 * LINE)
        assert memory.allocated == 8 * LINE and len(cache.lines) == 8
        memory.set_limit(2 * LINE)
        assert memory.allocated == 2 * LINE and len(cache.lines) == 2
        await cache.close()

    run(scenario())


RSS_SCRIPT = """
import asyncio, os, sys
from minidisk.namespace import Namespace
from minidisk.namespace.blockcache import LINE

LIMIT, FILE = int(sys.argv[1]), sys.argv[2]

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

async def main():
    ns = Namespace(cache_limit=LIMIT)
    ns.register("/blk", FILE, "blk")
    ref = ns.open_export("blk")
    device, chunk = ref.device, 1 << 20
    buf = memoryview(bytearray(chunk))
    await device.pread(buf, 0)  # start the I/O pool threads before measuring
    await device.pwrite(buf, 0)
    baseline = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for offset in range(0, device.size, chunk):
        await device.pread(buf, offset)
    for offset in range(0, device.size, chunk):
        buf[:8] = offset.to_bytes(8, "little")
        await device.pwrite(buf, offset)
    for offset in range(0, device.size, chunk):
        await device.pread(buf, offset)
        assert int.from_bytes(buf[:8], "little") == offset
    ref.close()
    await ns.aclose()
    print((kib("VmHWM") - baseline) * 1024)

asyncio.run(main())
"""


@pytest.mark.slow
def test_rss_stays_within_the_limit(tmp_path: Path) -> None:
    """Reading and rewriting a file 4× the -r limit grows RSS by at most the limit plus a fixed
    overhead; the same run with a limit as large as the file shows the measure would catch an
    unbounded cache."""
    limit, overhead = 16 << 20, 8 << 20
    host = tmp_path / "big.img"
    with host.open("wb") as f:
        for _ in range(4 * limit // (1 << 20)):
            f.write(b"\xa5" * (1 << 20))

    def growth(cache_limit: int) -> int:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(cache_limit),
                              str(host)], capture_output=True, text=True, check=True, timeout=120)
        return int(out.stdout)

    bounded = growth(limit)
    assert bounded <= limit + overhead, f"RSS grew {bounded >> 20} MiB"
    assert growth(8 * limit) >= 3 * limit  # control: an unbounded-ish cache is visible


def test_blk_key_uses_the_namespace_budget(ns: Namespace, tmp_path: Path, run: Run) -> None:
    host, other = tmp_path / "a.img", tmp_path / "c.img"
    host.write_bytes(bytes(16 * LINE))
    other.write_bytes(bytes(16 * LINE))
    ns.cache_memory.set_limit(3 * LINE)
    ns.register("/a", str(host), "blk")
    ns.register("/c", str(other), "chr")
    run(ns.lookup("/a").pread(memoryview(bytearray(16 * LINE)), 0))
    run(ns.lookup("/c").pread(memoryview(bytearray(16 * LINE)), 0))
    assert ns.cache_memory.allocated == 3 * LINE  # chr is uncached
