"""The write-back block cache behind `blk` drives, and the memory budget all such caches share.

rump_server's `-r TOTAL_RAM` caps the rump kernel's memory, which is mostly its buffer cache;
ours caps `CacheMemory`, the one pool every `BlockCache` of a namespace takes its lines from.
Nothing else in a cache grows with the data it sees, so a server reading a file many times
the limit stays within the limit plus a fixed overhead.

Design, and why:

* Lines are `LINE` (64 KiB) bytearrays. A line is clean or dirty. Clean lines of every cache sit
  in one LRU in the pool, so a cache that needs memory takes the least recently used clean line
  of *any* cache; dropping a clean line is synchronous and needs no lock of its owner.
* Dirty lines are only ever written back by their own cache (under its lock), so two caches
  never wait on each other. When the budget is all dirty lines of other caches, a cache does
  not wait: it reads around the cache and writes through to the host file. The cache is an
  optimisation, never a reason to block.
* Each cache serialises its requests with one asyncio lock: simple and obviously coherent, at
  the price of no parallel I/O on one `blk` drive (`reg` and `chr` drives have no such limit).
* Writes are acknowledged from the cache; FLUSH writes back dirty lines and then flushes the
  host file; a FUA write goes through to the host file with FUA (and updates cached lines);
  `close` (at remove and at halt) writes back and flushes. Extent queries report the host
  file's extents with dirty lines as data, without writing anything back.
* Trim and zero act on the host file first, then drop the lines inside their range, dirty
  or not, without writing them back (that data is being thrown away, and a TRIM on a full file
  system must not need space), and zero the part they cover of a line at either edge, so
  the cache reads what the host file now holds.
* Reads fill only lines the request covers completely (no read amplification); a write that
  covers part of an uncached line fills the rest of it from the host first.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator

from minidisk.device.api import BlockDevice, Caps, Extent

LINE = 64 * 1024
DEFAULT_CACHE_LIMIT = 64 * 1024 * 1024


class CacheMemory:
    """The budget for all block-cache lines of one namespace (`-r`)."""

    def __init__(self, limit: int = DEFAULT_CACHE_LIMIT) -> None:
        self.limit = limit
        self.allocated = 0  # bytes in lines, in use or on the free list
        self._free: list[bytearray] = []
        self._clean: OrderedDict[tuple[BlockCache, int], None] = OrderedDict()

    def set_limit(self, limit: int) -> None:
        """Change the budget; shrinking drops free and clean lines (dirty ones go on writeback)."""
        self.limit = limit
        self._trim_to_limit()

    def take(self) -> bytearray | None:
        """A line buffer: free, new within budget, or the LRU clean line of any cache; else None."""
        if self._free:
            return self._free.pop()
        if self.allocated + LINE <= self.limit:
            self.allocated += LINE
            return bytearray(LINE)
        if self._clean:
            (owner, lineno), _ = self._clean.popitem(last=False)
            return owner.lines.pop(lineno)
        return None

    def give_back(self, line: bytearray) -> None:
        self._free.append(line)
        self._trim_to_limit()

    def _trim_to_limit(self) -> None:
        while self.allocated > self.limit and (self._free or self._clean):
            if not self._free:
                (owner, lineno), _ = self._clean.popitem(last=False)
                self._free.append(owner.lines.pop(lineno))
            self._free.pop()
            self.allocated -= LINE

    def mark_clean(self, owner: BlockCache, lineno: int) -> None:
        self._clean[(owner, lineno)] = None

    def touch(self, owner: BlockCache, lineno: int) -> None:
        key = (owner, lineno)
        if key in self._clean:
            self._clean.move_to_end(key)

    def forget(self, owner: BlockCache, lineno: int) -> None:
        """The line is dirty or gone: it may not be stolen."""
        self._clean.pop((owner, lineno), None)


class BlockCache(BlockDevice):
    """A write-back cache of `backing`, with lines from `memory`."""

    def __init__(self, backing: BlockDevice, memory: CacheMemory,
                 spans: list[tuple[int, int]] | None = None) -> None:
        """`spans`, when given, are the only ranges [begin, end) of `backing` that writing a
        line back may write (and the caller keeps them current): a cache of a whole host
        file shared by windows must not write the bytes around them that a line was filled
        with over whatever else owns them."""
        self.backing = backing
        self.memory = memory
        self.spans = spans
        self.size = backing.size
        self.block_size = backing.block_size
        bc = backing.caps
        self.caps = Caps(
            read_only=bc.read_only, flush=True, fua=not bc.read_only, trim=bc.trim,
            zero=bc.zero, fast_zero=bc.fast_zero, extents=bc.extents, cache=bc.cache,
            # One cache object serves every connection, so a flush covers all of them.
            multi_conn=True, rotational=bc.rotational,
        )
        self.lines: dict[int, bytearray] = {}
        self.dirty: set[int] = set()
        self._lock = asyncio.Lock()

    # Lines of the device are [n*LINE, min((n+1)*LINE, size)).

    def _line_bytes(self, lineno: int) -> int:
        return min(LINE, self.size - lineno * LINE)

    def _segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(lineno, start in line, stop in line, position in request) for each line touched."""
        pos, end = offset, offset + length
        while pos < end:
            lineno, start = divmod(pos, LINE)
            stop = min(LINE, start + end - pos)
            yield lineno, start, stop, pos - offset
            pos += stop - start

    async def _fresh_line(self, lineno: int, covered: int,
                          may_write_back: bool) -> bytearray | None:
        """A new line for `lineno`, holding the host file's bytes except its first `covered`,
        which the caller overwrites as soon as this returns."""
        line = self.memory.take()
        if line is None and may_write_back and self.dirty:
            await self._write_back(sorted(self.dirty))
            line = self.memory.take()
        if line is None:
            return None
        have = covered
        try:
            # The line's length is read again after each await: a grow() meanwhile makes
            # the last line longer, and it cannot fill a line that is not in `lines` yet.
            while have < (want := self._line_bytes(lineno)):
                await self.backing.pread(memoryview(line)[have:want], lineno * LINE + have)
                have = want
        except BaseException:
            self.memory.give_back(line)
            raise
        self.lines[lineno] = line
        self.memory.mark_clean(self, lineno)
        return line

    def _dirty(self, lineno: int) -> None:
        self.memory.forget(self, lineno)
        self.dirty.add(lineno)

    async def _write_back(self, linenos: list[int]) -> None:
        async def one(lineno: int) -> None:
            line, start = memoryview(self.lines[lineno]), lineno * LINE
            end = start + self._line_bytes(lineno)
            for lo, hi in [(start, end)] if self.spans is None else _clip(self.spans, start, end):
                await self.backing.pwrite(line[lo - start:hi - start], lo)
            self.dirty.discard(lineno)
            self.memory.mark_clean(self, lineno)

        # A few writes at once keep the I/O pool busy without flooding it.
        for i in range(0, len(linenos), 8):
            await asyncio.gather(*(one(n) for n in linenos[i:i + 8]))

    def grow(self, size: int, read_blocking: Callable[[memoryview, int], None]) -> None:
        """The backing now has `size` bytes (more than before: a window past the old end joined
        a shared cache). A cached short last line gets the bytes it lacked, read at once with
        `read_blocking(buf, offset)`: registration cannot await, and a stale buffer tail
        would otherwise be written back over them."""
        last, have = divmod(self.size, LINE)
        line = self.lines.get(last) if have else None
        self.size = size
        if line is not None:
            read_blocking(memoryview(line)[have:self._line_bytes(last)], last * LINE + have)

    async def pread(self, buf: memoryview, offset: int) -> None:
        async with self._lock:
            miss: list[tuple[int, int, int, int]] = []
            for seg in self._segments(offset, len(buf)):
                lineno, start, stop, pos = seg
                line = self.lines.get(lineno)
                if line is None:
                    miss.append(seg)
                    continue
                buf[pos:pos + stop - start] = memoryview(line)[start:stop]
                self.memory.touch(self, lineno)
            for run in _runs(miss):
                lo, hi = run[0][3], run[-1][3] + run[-1][2] - run[-1][1]
                await self.backing.pread(buf[lo:hi], offset + lo)
                for lineno, start, stop, pos in run:
                    if start == 0 and stop == self._line_bytes(lineno):
                        line = self.memory.take()  # never writes back: reads stay reads
                        if line is None:
                            break
                        line[:stop] = buf[pos:pos + stop]
                        self.lines[lineno] = line
                        self.memory.mark_clean(self, lineno)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        async with self._lock:
            if fua:
                await self.backing.pwrite(buf, offset, True)
            for lineno, start, stop, pos in self._segments(offset, len(buf)):
                line = self.lines.get(lineno)
                if line is None and not fua:
                    line = await self._fresh_line(lineno, stop if start == 0 else 0,
                                                  may_write_back=True)
                    if line is None:
                        await self.backing.pwrite(buf[pos:pos + stop - start],
                                                  lineno * LINE + start)
                        continue
                if line is None:
                    continue
                line[start:stop] = buf[pos:pos + stop - start]
                if fua and lineno not in self.dirty:
                    self.memory.touch(self, lineno)  # now equal to the host file: stays clean
                else:
                    self._dirty(lineno)

    async def flush(self) -> None:
        async with self._lock:
            await self._write_back(sorted(self.dirty))
            await self.backing.flush()

    def _discard_range(self, offset: int, length: int) -> None:
        """The host file reads as zeroes in the range now (a trim or zero went through): drop
        the lines inside it, dirty or not, and zero the covered part of lines at its edges
        (they keep their state: a dirty edge still holds data outside the range)."""
        end = offset + length
        first, last = offset // LINE, (end - 1) // LINE
        for lineno in [n for n in self.lines if first <= n <= last]:
            line_start, line_bytes = lineno * LINE, self._line_bytes(lineno)
            lo, hi = max(offset - line_start, 0), min(end - line_start, line_bytes)
            if lo == 0 and hi == line_bytes:
                self.memory.forget(self, lineno)
                self.dirty.discard(lineno)
                self.memory.give_back(self.lines.pop(lineno))
            else:
                self.lines[lineno][lo:hi] = bytes(hi - lo)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        async with self._lock:
            await self.backing.trim(offset, length, fua)
            self._discard_range(offset, length)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        async with self._lock:
            await self.backing.zero(offset, length, may_trim, fast, fua)
            self._discard_range(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        async with self._lock:
            end = offset + length
            first, last = offset // LINE, (end - 1) // LINE
            runs: list[tuple[int, int]] = []  # dirty lines in the range, merged, clipped
            for lineno in sorted(n for n in self.dirty if first <= n <= last):
                lo, hi = max(lineno * LINE, offset), min((lineno + 1) * LINE, end)
                if runs and runs[-1][1] == lo:
                    runs[-1] = (runs[-1][0], hi)
                else:
                    runs.append((lo, hi))
            return _with_data(await self.backing.extents(offset, length), runs)

    async def cache(self, offset: int, length: int) -> None:
        await self.backing.cache(offset, length)

    async def close(self) -> None:
        async with self._lock:
            try:
                await self._write_back(sorted(self.dirty))
                if not self.backing.caps.read_only:
                    await self.backing.flush()
            finally:
                for lineno in list(self.lines):
                    self.memory.forget(self, lineno)
                    self.memory.give_back(self.lines.pop(lineno))
                self.dirty.clear()
                await self.backing.close()

    def describe(self) -> str:
        return (f"block cache ({len(self.lines)} lines, {len(self.dirty)} dirty) over "
                + self.backing.describe())


def _clip(spans: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) inside any of `spans`, ascending and merged."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted((max(lo, start), min(hi, end)) for lo, hi in spans):
        if lo >= hi:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _with_data(extents: list[Extent], runs: list[tuple[int, int]]) -> list[Extent]:
    """The host file's `extents`, with the ascending ranges `runs` (dirty lines) as data."""
    if not runs:
        return extents
    out: list[Extent] = []
    for e in extents:
        pos, end = e.offset, e.offset + e.length
        for lo, hi in runs:
            lo, hi = max(lo, pos), min(hi, end)
            if lo >= hi:
                continue
            if lo > pos:
                out.append(Extent(pos, lo - pos, e.flags))
            out.append(Extent(lo, hi - lo, 0))
            pos = hi
        if pos < end:
            out.append(Extent(pos, end - pos, e.flags))
    return out


def _runs(segments: list[tuple[int, int, int, int]]) -> Iterator[list[tuple[int, int, int, int]]]:
    """Split segments into runs that are contiguous in the request."""
    run: list[tuple[int, int, int, int]] = []
    for seg in segments:
        if run and run[-1][3] + run[-1][2] - run[-1][1] != seg[3]:
            yield run
            run = []
        run.append(seg)
    if run:
        yield run
