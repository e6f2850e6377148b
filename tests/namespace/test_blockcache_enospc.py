"""A TRIM or ZERO on a `blk` key drops the dirty lines it covers instead of writing them back
first, so it works on a full file system (issue 10, item 13)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.namespace.conftest import file_at, read, write

from minidisk.device.api import EXTENT_HOLE
from minidisk.namespace import Namespace
from minidisk.namespace.blockcache import LINE

S = 512


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (tmpfs punches holes, and its size= limit gives ENOSPC)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(fs: Path) -> None:
    """Write until the file system is full."""
    with (fs / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"f" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("op", ["trim", "zero"])
def test_trim_of_dirty_lines_on_a_full_file_system(tiny_fs: Path, op: str) -> None:
    """Dirty 4 lines (in the cache only: the file is a hole), fill the file system, TRIM or
    ZERO them, plus half a line on each side: the request succeeds, nothing of the trimmed
    range is written back, and the edges keep their data."""
    host = tiny_fs / "disk.img"
    host.touch()
    os.truncate(host, 16 * LINE)  # sparse: costs nothing until written back
    ns = Namespace()
    ns.register("/d", str(host), "blk")

    async def scenario() -> None:
        d = ns.lookup("/d")
        await write(d, LINE, b"e" * LINE)  # an edge line, written back before the fill
        await write(d, 6 * LINE, b"e" * LINE)
        await d.flush()
        await write(d, 2 * LINE, b"t" * 4 * LINE)  # dirty, to be discarded
        await write(d, LINE, b"E" * S)  # dirty edge bytes outside the trimmed range
        fill(tiny_fs)
        start, length = LINE + LINE // 2, 5 * LINE
        if op == "trim":
            await d.trim(start, length)
        else:
            await d.zero(start, length, may_trim=True)  # tmpfs has no ZERO_RANGE: punch
        assert await read(d, start, length) == bytes(length)
        assert await read(d, LINE, S) == b"E" * S  # the untrimmed edge is intact
        assert await read(d, LINE + S, LINE // 2 - S) == b"e" * (LINE // 2 - S)
        assert await read(d, start + length, LINE // 2) == b"e" * (LINE // 2)
        os.unlink(tiny_fs / "filler")
        await d.flush()
        await ns.aclose()

    asyncio.run(scenario())
    assert file_at(host, LINE, S) == b"E" * S
    assert file_at(host, LINE + LINE // 2, 5 * LINE) == bytes(5 * LINE)
    assert file_at(host, 6 * LINE + LINE // 2, LINE // 2) == b"e" * (LINE // 2)


def test_block_status_of_dirty_lines_on_a_full_file_system(tiny_fs: Path) -> None:
    """Extents of a range with dirty lines over a hole: answered without writing anything
    back (the full file system would refuse it), with the dirty lines reported as data."""
    host = tiny_fs / "disk.img"
    host.touch()
    os.truncate(host, 16 * LINE)
    ns = Namespace()
    ns.register("/d", str(host), "blk")

    async def scenario() -> None:
        d = ns.lookup("/d")
        await write(d, 3 * LINE + S, b"t" * 2 * LINE)  # dirty lines 3, 4 and 5, in a hole
        fill(tiny_fs)
        extents = await d.extents(0, 16 * LINE)
        assert sum(e.length for e in extents) == 16 * LINE
        pos = 0
        for e in extents:  # contiguous, and data exactly where lines are dirty
            assert e.offset == pos
            data = 3 * LINE <= e.offset < 6 * LINE
            assert (e.flags & EXTENT_HOLE == 0) == data, (e, extents)
            pos += e.length
        assert await read(d, 3 * LINE + S, 2 * LINE) == b"t" * 2 * LINE
        holes = await d.pread_sparse(memoryview(bytearray(16 * LINE)), 0)
        assert holes == [(0, 3 * LINE), (6 * LINE, 10 * LINE)]
        os.unlink(tiny_fs / "filler")
        await ns.aclose()

    asyncio.run(scenario())
    assert file_at(host, 3 * LINE + S, 2 * LINE) == b"t" * 2 * LINE
