"""The memory device's RAM: 32 KiB pages carved out of anonymous mappings.

Why not `bytearray(PAGE)`: that mallocs and zeroes the whole page, so the first 4 KiB written
to a fresh page faults in eight OS pages and writes 32 KiB of zeroes. Page faults are dear in
a VM (a fresh 32 KiB bytearray cost 20-120 µs here, a 4 KiB write into a fresh mapping ~6), and
a first write is what a thin pool's provisioning or a snapshot's copy-out does to its data
device. A private anonymous mapping is zero-filled by the kernel on first touch, 4 KiB at a
time, so a page costs only the OS pages written, and RAM follows what is written.

A freed page goes back to the kernel (MADV_DONTNEED: it reads as zeroes again and leaves the
resident set) and onto a free list, from which the next page is taken first; the mappings
themselves (64 MiB of address space each) are never unmapped, so they stay few. One pool
serves every memory device of the process. A device's pages are given back when the device
is collected, and never handed out while it holds them: no page's bytes reach another device
except as zeroes.
"""

from __future__ import annotations

import mmap

PAGE = 32 * 1024
ARENA = 64 * 1024 * 1024  # address space per mapping: 2048 pages

Slot = tuple[mmap.mmap, int]  # a page's mapping and its offset there


class PagePool:
    def __init__(self, page: int = PAGE, arena: int = ARENA) -> None:
        if page % mmap.PAGESIZE or arena % page:
            raise ValueError("pages must be whole OS pages and fill the arena")
        self.page = page
        self.arena = arena
        self._arenas: list[mmap.mmap] = []
        self._free: list[Slot] = []

    def take(self) -> tuple[memoryview, Slot]:
        """A zeroed page (a writable view) and its slot, for `give` later."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        mapping, offset = slot
        return memoryview(mapping)[offset:offset + self.page], slot

    def give(self, slot: Slot) -> None:
        """Back to the kernel and onto the free list; the caller keeps no view of it."""
        mapping, offset = slot
        mapping.madvise(mmap.MADV_DONTNEED, offset, self.page)
        self._free.append(slot)

    def give_all(self, slots: dict[int, Slot]) -> None:
        for slot in slots.values():
            self.give(slot)
        slots.clear()

    def _grow(self) -> None:
        mapping = mmap.mmap(-1, self.arena, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._arenas.append(mapping)
        # Reversed, so that pages come out in address order (pop takes from the end).
        self._free.extend((mapping, offset)
                          for offset in range(self.arena - self.page, -1, -self.page))

    @property
    def mapped(self) -> int:
        """Bytes of address space mapped (not RAM: only written OS pages are resident)."""
        return len(self._arenas) * self.arena


POOL = PagePool()
