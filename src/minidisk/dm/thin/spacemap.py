"""A space map's reference counts, in memory, and where its bitmaps live on disk.

The kernel keeps ref counts in bitmaps of 2 bits per block (0, 1, 2, "3 or more") and the
counts above 2 in a btree (dm-space-map-common.c). We hold every count in an array, which
is what the bitmaps and that btree are written from at commit (`metadata.py`), and note
which bitmaps changed so that only those are rewritten. One rule from the kernel's
transaction model lives here: a block freed in this transaction is not handed out again
until the transaction commits, because the committed metadata may still point at it.
"""

from __future__ import annotations

from array import array

from minidisk.dm.thin.disk import ENTRIES_PER_BITMAP


class NoSpace(OSError):
    def __init__(self, what: str) -> None:
        super().__init__(28, f"out of {what} space")  # ENOSPC


class SpaceMap:
    def __init__(self, what: str, nr_blocks: int = 0) -> None:
        self.what = what
        self.counts = array("I", bytes(4 * nr_blocks))
        self.nr_allocated = 0
        self.bitmaps: list[int] = []  # bitmap block per ENTRIES_PER_BITMAP blocks; 0 = none
        self.ref_count_root = 0  # btree of the counts above 2, as committed
        self.index_root = 0  # data map: the index btree; metadata map: the index block
        self.dirty: set[int] = set()  # bitmap numbers to rewrite
        self.overflow_dirty = True
        self.over: set[int] = set()  # blocks counted 3 or more
        self.freed: set[int] = set()  # freed in this transaction
        self.fresh: set[int] = set()  # allocated in this transaction
        self.hint = 0
        self._grow_bitmaps()

    @property
    def nr_blocks(self) -> int:
        return len(self.counts)

    @property
    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated

    def _grow_bitmaps(self) -> None:
        wanted = -(-self.nr_blocks // ENTRIES_PER_BITMAP)
        while len(self.bitmaps) < wanted:
            self.dirty.add(len(self.bitmaps))
            self.bitmaps.append(0)

    def extend(self, nr_blocks: int) -> None:
        if nr_blocks < self.nr_blocks:
            raise OSError(22, f"{self.what} device shrank from {self.nr_blocks} blocks "
                              f"to {nr_blocks}")
        if nr_blocks > self.nr_blocks:
            # The last bitmap gains entries too: rewrite it.
            if self.bitmaps and self.nr_blocks % ENTRIES_PER_BITMAP:
                self.dirty.add(len(self.bitmaps) - 1)
            self.counts.extend(array("I", bytes(4 * (nr_blocks - self.nr_blocks))))
            self._grow_bitmaps()

    def load_counts(self, first: int, counts: list[int]) -> None:
        """Counts read from a bitmap (without the dirty marking a change makes)."""
        end = min(first + len(counts), self.nr_blocks)
        for b in range(first, end):
            c = counts[b - first]
            if c:
                self.counts[b] = c
                self.nr_allocated += 1
                if c >= 3:
                    self.over.add(b)

    def get(self, b: int) -> int:
        return self.counts[b]

    def set(self, b: int, count: int) -> None:
        old = self.counts[b]
        if old == count:
            return
        self.counts[b] = count
        if not old:
            self.nr_allocated += 1
        elif not count:
            self.nr_allocated -= 1
            if b in self.fresh:
                self.fresh.discard(b)
            else:
                self.freed.add(b)
        if old >= 3 or count >= 3:
            self.overflow_dirty = True
            if count >= 3:
                self.over.add(b)
            else:
                self.over.discard(b)
        if min(old, 3) != min(count, 3) or (not old) != (not count):
            self.dirty.add(b // ENTRIES_PER_BITMAP)

    def inc(self, b: int) -> None:
        self.set(b, self.counts[b] + 1)

    def dec(self, b: int) -> int:
        c = self.counts[b]
        if not c:
            raise OSError(5, f"{self.what} block {b} freed twice")  # EIO: metadata is wrong
        self.set(b, c - 1)
        return c - 1

    def alloc(self) -> int:
        """A free block not freed in this transaction, counted 1, searching from the last
        allocation on (as the kernel's `begin` hint does, so allocations run in order)."""
        counts, freed = self.counts, self.freed
        for start, stop in ((self.hint, self.nr_blocks), (0, self.hint)):
            at = start
            while at < stop:
                try:
                    b = counts.index(0, at, stop)
                except ValueError:
                    break
                if b not in freed:
                    self.set(b, 1)
                    self.fresh.add(b)
                    self.hint = b + 1
                    return b
                at = b + 1
        raise NoSpace(self.what)

    def bitmap_counts(self, i: int) -> list[int]:
        first = i * ENTRIES_PER_BITMAP
        return self.counts[first:first + ENTRIES_PER_BITMAP].tolist()

    def index_entry(self, i: int) -> tuple[int, int, int]:
        """(bitmap blocknr, nr_free, none_free_before) as the kernel keeps them: nr_free
        counts the whole bitmap, entries past the device's end included."""
        counts = self.bitmap_counts(i)
        used = len(counts) - counts.count(0)
        try:
            first_free = counts.index(0)
        except ValueError:
            first_free = len(counts)
        return self.bitmaps[i], ENTRIES_PER_BITMAP - used, first_free

    def overflow(self) -> list[tuple[int, int]]:
        return [(b, self.counts[b]) for b in sorted(self.over)]

    def end_transaction(self) -> None:
        self.dirty.clear()
        self.freed.clear()
        self.fresh.clear()
        self.overflow_dirty = False
