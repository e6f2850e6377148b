"""`log-writes <dev> <log_dev>`: record every write to a log (DOC/log-writes.rst).

I/O goes to `dev`; each completed write is remembered, and written to the log only when a
later FLUSH completes, so the log's order is the order data became stable: writes that
completed before the flush was issued, then the flush entry. A FUA write is logged as soon
as it completes; a mark (`message ... mark NAME`) is logged at once. Trims are logged as
DISCARD entries; zeroing is logged as a write of zero data, so a replay reproduces it
exactly. Log entries are written by one drain at a time, in queue order, and a flush, FUA
write or mark is acknowledged only after its entries (and the log device) are flushed.

Status: `<entries logged> <highest log sector allocated>`. When the log device fills,
logging stops (as the kernel's "Ran out of space on the logdev") and I/O carries on.
The format is the kernel's (see `writelog.py`), so xfstests' replay-log reads our logs. One
difference: the kernel rewrites the super's entry count only after FUA writes and marks; we
rewrite it after every batch of entries (every flush too), so a log cut at any acknowledged
flush is complete up to that flush.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from dataclasses import dataclass

from minidisk.device.api import Extent
from minidisk.dm import writelog
from minidisk.dm.status import LogWritesStatus
from minidisk.dm.status_table import LogWritesTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import DeviceRef, Target, TargetContext, TargetError, combine_caps
from minidisk.dm.writelog import DISCARD, FLUSH, FUA, MARK

log = logging.getLogger(__name__)

_ZEROES = bytes(1 << 20)


@dataclass(slots=True)
class Pending:
    flags: int
    sector: int = 0  # sectorsize units
    nr_sectors: int = 0
    data: bytes | None = None  # None with nr_sectors: zeroes
    mark: bytes = b""


class LogWrites(Target):
    name = "log-writes"
    version = (1, 1, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) != 2:
            raise TargetError("Invalid argument count: expected <dev> <log_dev>")
        self.ref = ctx.device(args[0], 0)
        self.log_ref = ctx.device(args[1], 0, 0)
        self.child = self.ref.device
        self.logdev = self.log_ref.device
        if self.logdev.caps.read_only:
            raise TargetError(f"log device {args[1]} is read-only")
        self.sectorsize = max(SECTOR, self.child.block_size.minimum)
        self.block_size = self.child.block_size
        self.caps = combine_caps([self.child.caps])
        self.next_sector = self.sectorsize // SECTOR  # in 512-byte sectors, as the kernel
        self.end_sector = self.logdev.size // SECTOR
        self.logged = 0
        self.enabled = True
        self.started = False
        self.unflushed: list[Pending] = []
        self.queue: deque[Pending] = deque()
        self._lock = asyncio.Lock()

    def status_table(self) -> LogWritesTable:
        return LogWritesTable(self.ref.key, self.log_ref.key)

    def status_info(self) -> LogWritesStatus:
        return LogWritesStatus(self.logged, self.next_sector - 1)

    def devices(self) -> list[DeviceRef]:
        return [self.ref, self.log_ref]

    async def resume(self) -> None:
        if not self.started:
            # A fresh, valid, empty log from the moment the table goes live.
            self.started = True
            await self.logdev.pwrite(
                memoryview(writelog.encode_super(0, self.sectorsize)), 0)

    async def destroy(self) -> None:
        if self.started and self.enabled:
            self.queue.extend(self.unflushed)
            self.unflushed = []
            self._mark(writelog.END_MARK)
            await self._drain()

    # I/O

    def _sectors(self, offset: int, length: int) -> tuple[int, int]:
        ss = self.sectorsize
        if offset % ss or length % ss:
            raise OSError(errno.EINVAL, f"log-writes needs {ss}-byte aligned requests")
        return offset // ss, length // ss

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if not self.enabled:
            await self.child.pwrite(buf, offset, fua)
            return
        sector, count = self._sectors(offset, len(buf))
        data = bytes(buf)  # the caller may reuse its buffer before the next flush
        await self.child.pwrite(buf, offset, fua)
        self._completed(Pending(FUA if fua else 0, sector, count, data))
        if fua:
            await self._drain()

    def _completed(self, block: Pending) -> None:
        if block.flags & FUA:
            self.queue.append(block)
        else:
            self.unflushed.append(block)

    async def flush(self) -> None:
        if not self.enabled:
            if self.child.caps.flush:
                await self.child.flush()
            return
        stable, self.unflushed = self.unflushed, []
        if self.child.caps.flush:
            await self.child.flush()
        self.queue.extend(stable)
        self.queue.append(Pending(FLUSH))
        await self._drain()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        sector, count = self._sectors(offset, length)
        await self.child.trim(offset, length, fua)
        if self.enabled:
            self._completed(Pending(DISCARD | (FUA if fua else 0), sector, count))
            if fua:
                await self._drain()

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        sector, count = self._sectors(offset, length)
        await self.child.zero(offset, length, may_trim, fast, fua)
        if self.enabled:
            self._completed(Pending(FUA if fua else 0, sector, count))
            if fua:
                await self._drain()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.child.extents(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

    async def message(self, args: list[str]) -> str | None:
        if len(args) != 2:
            raise OSError(errno.EINVAL, f"Invalid log-writes message arguments, expect 2 "
                                        f"arguments, got {len(args)}")
        if args[0].lower() != "mark":
            raise OSError(errno.EINVAL,
                          f"Unrecognised log writes target message received: {args[0]}")
        self._mark(args[1])
        await self._drain()
        return None

    def _mark(self, text: str) -> None:
        data = text.encode()[:writelog.max_mark_length(self.sectorsize)]
        self.queue.append(Pending(MARK, mark=data))

    # The log writer

    async def _drain(self) -> None:
        """Write queued entries in order; return once those queued before the call are logged.

        One drain writes at a time (the lock). A caller that waited for the lock finds its
        entries either already written by the previous holder or still queued for itself.
        """
        async with self._lock:
            if not self.queue:
                return
            try:
                logged = self.logged
                while self.queue:
                    block = self.queue.popleft()
                    if self.enabled:
                        await self._log_one(block)
                if self.logged != logged:
                    await self._write_super()
                if self.logdev.caps.flush:
                    await self.logdev.flush()
            except OSError as e:
                log.error("log-writes: writing the log failed, logging stops: %s", e)
                self.enabled = False
                self.queue.clear()

    async def _log_one(self, block: Pending) -> None:
        ss = self.sectorsize
        per_block = ss // SECTOR
        sector = self.next_sector
        blocks = 1 if block.flags & (DISCARD | MARK) else 1 + block.nr_sectors
        self.next_sector += blocks * per_block
        if self.next_sector >= self.end_sector:
            log.error("log-writes: ran out of space on the log device; logging stops")
            self.enabled = False
            self.queue.clear()
            return
        self.logged += 1
        at = sector * SECTOR
        header = writelog.encode_entry(block.sector, block.nr_sectors, block.flags, block.mark,
                                       ss)
        await self.logdev.pwrite(memoryview(header), at)
        if blocks > 1:
            await self._write_data(block, at + ss)

    async def _write_super(self) -> None:
        await self.logdev.pwrite(
            memoryview(writelog.encode_super(self.logged, self.sectorsize)), 0)

    async def _write_data(self, block: Pending, at: int) -> None:
        if block.data is not None:
            await self.logdev.pwrite(memoryview(block.data), at)
            return
        length = block.nr_sectors * self.sectorsize
        done = 0
        while done < length:
            n = min(len(_ZEROES), length - done)
            await self.logdev.pwrite(memoryview(_ZEROES)[:n], at + done)
            done += n
