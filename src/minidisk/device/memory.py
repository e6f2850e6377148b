"""Sparse memory device: only written pages use RAM.

Pages are 32 KiB, as in nbdkit's sparse array: small enough that a 1 TiB device with
100 MiB written holds about 100 MiB, large enough that a 1 MiB request touches only 32
pages (per-page Python overhead dominated big requests with 4 KiB pages: 1 MiB reads ran at
0.7 GiB/s). They come from anonymous mappings (pages.py), which the kernel fills with
zeroes 4 KiB at a time as they are first written, so scattered 4 KiB writes cost 4 KiB of
RAM each, not a page's 32.
A sorted index of allocated pages answers extent queries
without walking the holes, so `nbdinfo --map` of a huge, mostly empty device is instant.
All operations finish without awaiting: the server runs them inline, with no task switch.
"""

from __future__ import annotations

import bisect
import weakref

from minidisk.device.api import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockDevice,
    BlockSize,
    Caps,
    Extent,
)
from minidisk.device.pages import PAGE, POOL, Slot

_ZERO_BYTES = bytes(PAGE)
_ZERO_PAGE = memoryview(_ZERO_BYTES)  # a view: slicing it copies nothing


class MemoryDevice(BlockDevice):
    caps = Caps(flush=True, fua=True, trim=True, zero=True, fast_zero=True, extents=True,
                cache=True, multi_conn=True)

    def __init__(self, size: int, block_size: BlockSize | None = None) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self.size = size
        self.block_size = block_size or BlockSize()
        self._pages: dict[int, memoryview] = {}
        self._slots: dict[int, Slot] = {}  # each page's place in the pool, to give it back
        self._index: list[int] = []  # sorted keys of _pages
        weakref.finalize(self, POOL.give_all, self._slots)

    @property
    def allocated(self) -> int:
        """Bytes of RAM held by data pages."""
        return len(self._pages) * PAGE

    def _page(self, n: int) -> memoryview:
        page = self._pages.get(n)
        if page is None:
            page, self._slots[n] = POOL.take()
            self._pages[n] = page
            bisect.insort(self._index, n)
        return page

    def _drop(self, n: int) -> None:
        if self._pages.pop(n, None) is not None:
            POOL.give(self._slots.pop(n))
            del self._index[bisect.bisect_left(self._index, n)]

    # Each operation first tries a request inside one page (every small request): one copy
    # and no loop.

    async def pread(self, buf: memoryview, offset: int) -> None:
        n, start = divmod(offset, PAGE)
        stop = start + len(buf)
        if stop <= PAGE:
            page = self._pages.get(n)
            buf[:] = _ZERO_PAGE[:stop - start] if page is None else page[start:stop]
            return
        pages = self._pages
        pos, end = 0, len(buf)
        while pos < end:
            n, start = divmod(offset + pos, PAGE)
            step = min(PAGE - start, end - pos)
            page = pages.get(n)
            if page is None:
                buf[pos:pos + step] = _ZERO_PAGE[:step]
            elif step == PAGE:
                buf[pos:pos + step] = page  # no intermediate slice copy
            else:
                buf[pos:pos + step] = page[start:start + step]
            pos += step

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        """One pass: copy allocated pages, report missing ones as holes (merged)."""
        n, start = divmod(offset, PAGE)
        stop = start + len(buf)
        if stop <= PAGE:
            page = self._pages.get(n)
            if page is None:
                return [(offset, stop - start)] if stop > start else []
            buf[:] = page[start:stop]
            return []
        pages = self._pages
        holes: list[tuple[int, int]] = []
        pos, end = 0, len(buf)
        while pos < end:
            n, start = divmod(offset + pos, PAGE)
            step = min(PAGE - start, end - pos)
            page = pages.get(n)
            if page is None:
                if holes and holes[-1][0] + holes[-1][1] == offset + pos:
                    holes[-1] = (holes[-1][0], holes[-1][1] + step)
                else:
                    holes.append((offset + pos, step))
            elif step == PAGE:
                buf[pos:pos + step] = page
            else:
                buf[pos:pos + step] = page[start:start + step]
            pos += step
        return holes

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        n, start = divmod(offset, PAGE)
        stop = start + len(buf)
        if stop <= PAGE:
            if stop > start:  # a write of nothing allocates no page
                self._page(n)[start:stop] = buf
            return
        pos, end = 0, len(buf)
        while pos < end:
            n, start = divmod(offset + pos, PAGE)
            step = min(PAGE - start, end - pos)
            self._page(n)[start:start + step] = buf[pos:pos + step]
            pos += step

    async def flush(self) -> None:
        """Nothing is cached above RAM, so every acknowledged write is already 'stable'."""

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._clear(offset, length)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        # A hole reads as zeroes, so zeroing and trimming are the same, and always fast.
        self._clear(offset, length)

    def _clear(self, offset: int, length: int) -> None:
        end = offset + length
        first, last = offset // PAGE, (end - 1) // PAGE
        if length == 0:
            return
        # Whole pages inside the range are dropped; walk only the allocated ones.
        lo = bisect.bisect_left(self._index, first)
        hi = bisect.bisect_right(self._index, last)
        for n in self._index[lo:hi]:
            start = max(offset, n * PAGE) - n * PAGE
            stop = min(end, (n + 1) * PAGE) - n * PAGE
            if start == 0 and stop == PAGE:
                self._drop(n)
                continue
            page = self._pages[n]
            page[start:stop] = _ZERO_PAGE[:stop - start]
            if page.tobytes() == _ZERO_BYTES:  # a copy and a memcmp: faster than counting
                self._drop(n)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        index = self._index
        lo = bisect.bisect_left(index, offset // PAGE)
        hi = bisect.bisect_left(index, -(-end // PAGE))
        out: list[Extent] = []
        pos = offset
        i = lo
        while i < hi:  # one data extent per run of consecutive allocated pages
            first = index[i]
            while i + 1 < hi and index[i + 1] == index[i] + 1:
                i += 1
            run_start = max(first * PAGE, offset)
            run_end = min((index[i] + 1) * PAGE, end)
            if run_start > pos:
                out.append(Extent(pos, run_start - pos, EXTENT_HOLE | EXTENT_ZERO))
            out.append(Extent(run_start, run_end - run_start, 0))
            pos = run_end
            i += 1
        if pos < end:
            out.append(Extent(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO))
        return out

    async def cache(self, offset: int, length: int) -> None:
        """Everything is already in memory."""

    def describe(self) -> str:
        return f"memory {self.size} bytes, {self.allocated} allocated"
