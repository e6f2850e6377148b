"""`blk` keys over one host file share one block cache (issue 10, item 12): a flush through
one key never writes back a line that is stale for another."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest
from tests.namespace.conftest import file_at, read, write

from minidisk.namespace import Namespace, apply, parse
from minidisk.namespace.blockcache import LINE

S = 512


def test_flush_through_one_key_never_undoes_the_other(tmp_path: Path) -> None:
    """A writes sector 0 and flushes, B writes sector 0 and flushes, A writes sector 1 (same
    cache line) and flushes: the file and both keys hold B's sector 0."""
    host = tmp_path / "h.img"
    host.write_bytes(bytes(16 * LINE))
    ns = Namespace()
    ns.register("/a", str(host), "blk")
    ns.register("/b", str(host), "blk")

    async def scenario() -> None:
        a, b = ns.open_export("a"), ns.open_export("b")
        await write(a.device, 0, b"A" * S)
        await a.device.flush()
        await write(b.device, 0, b"B" * S)
        await b.device.flush()
        assert file_at(host, 0, S) == b"B" * S
        assert await read(a.device, 0, S) == b"B" * S  # not A's stale line
        await write(a.device, S, b"a" * S)
        await a.device.flush()
        assert file_at(host, 0, S) == b"B" * S  # A's flush did not write its old line 0
        await b.device.flush()
        a.close()
        b.close()
        await ns.aclose()

    asyncio.run(scenario())
    assert file_at(host, 0, 2 * S) == b"B" * S + b"a" * S


def test_windows_at_different_offsets_share_lines(tmp_path: Path) -> None:
    """Key B is [LINE/2, +4 LINE) of the file that key A covers whole, and key C reaches it
    through a hard link: offsets translate, and every key sees every other key's writes."""
    host = tmp_path / "h.img"
    host.write_bytes(bytes(8 * LINE))
    os.link(host, tmp_path / "hard.img")
    ns = Namespace()
    ns.register("/a", str(host), "blk")
    ns.register("/b", str(host), "blk", LINE // 2, 4 * LINE)
    ns.register("/c", str(tmp_path / "hard.img"), "blk", LINE, LINE)

    async def scenario() -> None:
        a, b, c = ns.lookup("/a"), ns.lookup("/b"), ns.lookup("/c")
        await write(a, LINE, b"1" * S)
        await write(b, LINE // 2 + S, b"2" * S)  # file offset LINE + S
        await write(c, 2 * S, b"3" * S)  # file offset LINE + 2S
        expected = b"1" * S + b"2" * S + b"3" * S
        assert await read(a, LINE, 3 * S) == expected
        assert await read(b, LINE // 2, 3 * S) == expected
        assert await read(c, 0, 3 * S) == expected
        await c.flush()
        assert file_at(host, LINE, 3 * S) == expected
        await ns.aclose()

    asyncio.run(scenario())


def test_growing_the_file_for_a_new_window_keeps_the_shared_tail(tmp_path: Path) -> None:
    """The file ends inside a cached dirty line; a drivespec for a second window grows it:
    writing that line back must not put stale buffer bytes past the old end."""
    host = tmp_path / "h.img"
    old_size = LINE + 100 * S
    host.write_bytes(b"o" * old_size)
    ns = Namespace()
    apply(parse(f"key=/a,hostpath={host},size=host"), ns)

    async def scenario() -> None:
        a = ns.lookup("/a")
        await write(a, 0, b"g" * LINE)  # a line buffer full of g, given back by the trim:
        await a.trim(0, LINE)  # the next line taken is that buffer, not a fresh zeroed one
        await write(a, LINE, b"x" * S)  # dirty, partial last line
        apply(parse(f"key=/b,hostpath={host},offset={2 * LINE},size={LINE}"), ns)
        b = ns.lookup("/b")
        await write(b, 0, b"y" * S)
        await b.flush()
        await ns.aclose()

    asyncio.run(scenario())
    data = host.read_bytes()
    assert len(data) == 3 * LINE
    assert data[:LINE] == bytes(LINE)
    assert data[LINE:LINE + S] == b"x" * S
    assert data[LINE + S:old_size] == b"o" * (old_size - LINE - S)
    assert data[old_size:2 * LINE] == bytes(2 * LINE - old_size)  # grown: zeroes
    assert data[2 * LINE:2 * LINE + S] == b"y" * S


def test_removing_one_key_keeps_the_other_and_its_data(tmp_path: Path) -> None:
    host = tmp_path / "h.img"
    host.write_bytes(bytes(4 * LINE))
    ns = Namespace()
    ns.register("/a", str(host), "blk")
    ns.register("/b", str(host), "blk")

    async def scenario() -> None:
        await write(ns.lookup("/a"), 0, b"A" * S)
        await ns.remove("/a")
        assert file_at(host, 0, S) == b"A" * S  # removal writes back, as before
        b = ns.lookup("/b")
        await write(b, S, b"B" * S)
        assert await read(b, 0, 2 * S) == b"A" * S + b"B" * S
        ns.register("/a", str(host), "blk")  # a new key joins the live cache
        assert await read(ns.lookup("/a"), 0, 2 * S) == b"A" * S + b"B" * S
        await ns.aclose()

    asyncio.run(scenario())
    assert file_at(host, 0, 2 * S) == b"A" * S + b"B" * S


def test_write_back_never_touches_bytes_outside_every_blk_window(tmp_path: Path) -> None:
    """The shared cache's lines are in file coordinates, so a line at a window's edge also
    holds bytes of the file outside it: a `reg` key (or anything else) owns those, and
    writing the line back must not put the bytes the line was filled with over theirs."""
    host = tmp_path / "h.img"
    host.write_bytes(bytes(4 * LINE))
    edge = LINE + LINE // 2  # the blk window ends halfway through line 1
    ns = Namespace()
    ns.register("/b", str(host), "blk", 0, edge)
    ns.register("/r", str(host), "reg", edge, LINE)

    async def scenario() -> None:
        b, r = ns.lookup("/b"), ns.lookup("/r")
        await write(b, edge - S, b"B" * S)  # fills line 1 from the file, and dirties it
        await write(r, 0, b"R" * S)  # straight to the file, next to it
        await r.flush()
        await b.flush()
        await ns.aclose()

    asyncio.run(scenario())
    assert file_at(host, edge - S, 2 * S) == b"B" * S + b"R" * S


@pytest.mark.parametrize("seed", range(4))
def test_overlapping_windows_match_a_model_under_a_tiny_budget(tmp_path: Path,
                                                               seed: int) -> None:
    """Random I/O through three overlapping blk windows of one file (edges inside lines, a
    5-line budget), with a reg key over bytes no blk window maps: every read matches the
    model of the file, the file matches it after every flush, and the budget holds."""
    rng = random.Random(seed)
    size = 24 * LINE + 7 * S
    host = tmp_path / "h.img"
    model = bytearray(rng.randbytes(size))
    host.write_bytes(model)
    ns = Namespace(cache_limit=5 * LINE)
    windows = {"/a": (0, 16 * LINE), "/b": (LINE // 2 + 3 * S, 10 * LINE),
               "/c": (5 * LINE + S, 19 * LINE + 3 * S)}  # ends where /r begins
    for key, (begin, length) in windows.items():
        ns.register(key, str(host), "blk", begin, length)
    ns.register("/r", str(host), "reg", size - 3 * S, 3 * S)  # after every blk window
    assert all(b + n <= size - 3 * S for b, n in windows.values())

    async def scenario() -> None:
        for step in range(500):
            key = rng.choice(list(windows))
            begin, length = windows[key]
            device = ns.lookup(key)
            sectors = length // S
            start = rng.randrange(sectors)
            count = min(rng.choice([1, 2, 127, 128, 129, 300]), sectors - start)
            offset, n = start * S, count * S
            where = begin + offset
            op = rng.choice(["read", "read", "write", "write", "fua", "flush", "trim", "zero",
                             "reg"])
            if op == "read":
                assert await read(device, offset, n) == model[where:where + n], step
            elif op in ("write", "fua"):
                data = rng.randbytes(n)
                await device.pwrite(memoryview(data), offset, op == "fua")
                model[where:where + n] = data
            elif op == "flush":
                await device.flush()
                assert host.read_bytes() == model, step
            elif op == "trim":
                await device.trim(offset, n)
                model[where:where + n] = bytes(n)
            elif op == "zero":
                await device.zero(offset, n)
                model[where:where + n] = bytes(n)
            else:
                data = rng.randbytes(3 * S)
                await write(ns.lookup("/r"), 0, data)
                model[size - 3 * S:] = data
            assert ns.cache_memory.allocated <= ns.cache_memory.limit
        await ns.aclose()

    asyncio.run(scenario())
    assert host.read_bytes() == model


def test_uncached_keys_never_overlap_a_cached_window(tmp_path: Path) -> None:
    """A reg or chr key (or a file below a directory key) over bytes a blk key caches would
    read stale bytes past the cache and have its writes undone by the cache's write-back:
    it is refused (EBUSY, naming the file), in either order; beside the window it is fine."""
    tree = tmp_path / "tree"
    tree.mkdir()
    host = tree / "h.img"
    host.write_bytes(bytes(4 * LINE))
    ns = Namespace()

    def busy(*args: object) -> str:
        with pytest.raises(OSError) as info:
            ns.register(*args)  # type: ignore[arg-type]
        assert info.value.errno == errno.EBUSY
        return str(info.value.strerror)

    async def scenario() -> None:
        ns.register("/b", str(host), "blk", LINE, 2 * LINE)
        assert str(host) in busy("/r", str(host), "reg", 0, LINE + S)
        busy("/c", str(host), "chr", 2 * LINE, LINE)
        ns.register("/r", str(host), "reg", 0, LINE)  # beside it
        ns.register("/c", str(host), "chr", 3 * LINE, LINE)
        ns.register("/t", str(tree), "dir")
        with pytest.raises(OSError) as info:
            ns.open_export("t/h.img")  # the whole file, through the directory key
        assert info.value.errno == errno.EBUSY
        await ns.remove("/b")
        ref = ns.open_export("t/h.img")  # nothing cached any more
        busy("/b", str(host), "blk", LINE, LINE)  # the other way round
        ref.close()
        await asyncio.sleep(0)  # its background close
        await ns.remove("/r")
        await ns.remove("/c")
        ns.register("/b", str(host), "blk")
        await ns.aclose()

    asyncio.run(scenario())
