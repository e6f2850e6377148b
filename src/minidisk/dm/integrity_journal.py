"""dm-integrity's journal (J mode): group commit of queued requests to the ring's next
sections (data sectors, flush, entry sectors, flush), write-back to their places, 6.1's
replay_journal on load and the empty ring a clean shutdown leaves. The target
(targets/integrity.py) owns the devices, geometry and tags; this owns the ring's state."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import TYPE_CHECKING

from minidisk.dm.integrity_format import (
    FLAG_DIRTY_BITMAP,
    JOURNAL_BLOCK_SECTORS,
    SB_SECTORS,
    JournalEntry,
    empty_journal,
    plan_replay,
    section_entries,
    section_image,
)
from minidisk.dm.table import SECTOR
from minidisk.dm.target import flush_device

if TYPE_CHECKING:
    from minidisk.dm.targets.integrity import Integrity

log = logging.getLogger("minidisk.dm.targets.integrity")


class Journal:
    def __init__(self, target: Integrity) -> None:
        self.target = target
        self.commit_seq = 0
        self.free_section = 0
        self.wrote = False  # since the last load or clean shutdown
        self._queue: list[tuple[list[JournalEntry], asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def empty(self) -> None:
        """As the kernel leaves it at a clean shutdown: every section empty, the ring's
        position kept in the sequences."""
        n = self.target.sb.journal_sections
        await self._init(self.free_section, n - self.free_section, self.commit_seq)
        await self._init(0, self.free_section, (self.commit_seq + 1) % 4)

    async def replay(self) -> None:
        """replay_journal: write back what the journal's consistent sections hold, then
        continue after them or clear it (a bitmap-mode device's journal area holds its
        bitmap instead while the flag says so)."""
        t = self.target
        if t.sb.flags & FLAG_DIRTY_BITMAP:
            return
        geo, ss = t.geo, t.geo.section_sectors
        journal = await t._read(self._at(0), t.sb.journal_sections * ss * SECTOR)
        plan = plan_replay(geo, journal, t.mode)
        if plan.corrupt:
            log.error("integrity: journal commit id of no known sequence")
            t.failed = True
        for section in plan.replay:
            raw = journal[section * ss * SECTOR:(section + 1) * ss * SECTOR]
            for entry in section_entries(geo, raw):
                if entry.sector >= t.provided:
                    continue
                if entry.tag != t._tags(entry.sector, entry.data):
                    log.error("integrity: tag mismatch when replaying journal")
                    t.failed = True
                await t._write(geo.data_sector(entry.sector) * SECTOR, entry.data)
                await t._write(geo.tag_byte(entry.sector), entry.tag)
        if plan.replay:
            await flush_device(t.child)
        for first, count, seq in plan.clear:
            await self._init(first, count, seq)
        self.commit_seq, self.free_section = plan.commit_seq, plan.continue_section
        self.wrote = False

    def _at(self, section: int) -> int:
        t = self.target
        return (t.start + SB_SECTORS + section * t.geo.section_sectors) * SECTOR

    async def _init(self, first: int, count: int, seq: int) -> None:
        """init_journal: `count` sections from `first` (round the ring) empty, with `seq`."""
        t = self.target
        ss = t.geo.section_sectors
        for k in range(count):
            section = (first + k) % t.sb.journal_sections
            await t._write(self._at(section),
                              empty_journal(t.geo, section * ss, ss, seq))
        if count:
            await flush_device(t.child)

    async def write(self, first: int, buf: memoryview) -> None:
        """J mode: the request's blocks join the queue of the journal's committer and the
        request completes once they are in their places."""
        t = self.target
        block = t.opts.sectors_per_block * SECTOR
        tags, size = t._tags(first, buf), t.tag_size
        entries = [JournalEntry(first + i * t.opts.sectors_per_block,
                                bytes(buf[i * block:(i + 1) * block]),
                                tags[i * size:(i + 1) * size])
                   for i in range(len(buf) // block)]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((entries, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit())
        await done

    async def _commit(self) -> None:
        """Group commit: whatever requests are queued (at most a ring's worth) go to the
        next journal sections, each section whole (its data sectors, a flush, its entry
        sectors, a flush: a section cut short by a crash has sectors of two sequences and
        is not replayed), then every block to its place and a flush (before the ring
        comes back to those sections), and then the requests complete."""
        t = self.target
        capacity = t.geo.journal_entries
        while self._queue:
            batch: list[tuple[list[JournalEntry], asyncio.Future[None]]] = []
            count = 0
            while self._queue and (not batch or count + len(
                    self._queue[0][0]) <= capacity):
                batch.append(self._queue.pop(0))
                count += len(batch[-1][0])
            try:
                await self._commit_batch([e for entries, _ in batch for e in entries])
            except BaseException as e:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(e if isinstance(e, OSError)
                                           else OSError(errno.EIO, str(e)))
                if not isinstance(e, Exception):
                    raise
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _commit_batch(self, entries: list[JournalEntry]) -> None:
        t = self.target
        per = t.geo.section_entries
        meta = JOURNAL_BLOCK_SECTORS * SECTOR
        for pos in range(0, len(entries), per):
            section = self.free_section
            image = section_image(t.geo, section, self.commit_seq, entries[pos:pos + per])
            at = self._at(section)
            await t._write(at + meta, image[meta:])
            await flush_device(t.child)
            await t._write(at, image[:meta])
            await flush_device(t.child)
            self.wrote = True
            self.free_section += 1
            if self.free_section == t.sb.journal_sections:
                self.free_section = 0
                self.commit_seq = (self.commit_seq + 1) % 4
        # Back to their places, runs of consecutive blocks of one area a write each.
        il, spb = t.geo.interleave, t.opts.sectors_per_block
        run: list[JournalEntry] = []
        for e in [*entries, None]:
            if run and (e is None or e.sector != run[-1].sector + spb
                        or e.sector % il == 0):
                first = run[0].sector
                await t._write(t.geo.data_sector(first) * SECTOR,
                                  b"".join(r.data for r in run))
                await t._write(t.geo.tag_byte(first), b"".join(r.tag for r in run))
                run = []
            if e is not None:
                run.append(e)
        await flush_device(t.child)
