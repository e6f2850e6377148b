"""`delay <dev> <off> <ms> [<wdev> <woff> <wms> [<fdev> <foff> <fms>]]` (DOC/delay.rst).

Reads use the first triple; writes, trims and zeroes the second (or the first); flushes the
third (or the write triple). A request waits its class's delay before it is sent on, as the
kernel queues bios before submission. Status shows how many requests of each class are
being held right now. Delays are timers of the target's `Clock` (dm/clock.py). Suspending
releases everything held at once (`delay_presuspend`), so a suspend never waits out the
delays; holding starts again on resume.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, replace

from minidisk.device.api import BlockDevice, Extent
from minidisk.dm.clock import MONOTONIC, Clock
from minidisk.dm.status import DelayStatus
from minidisk.dm.status_table import DelayClassTable, DelayTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import (
    DeviceRef,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
    parse_uint,
)


@dataclass(eq=False)
class DelayClass:
    ref: DeviceRef
    start: int  # sectors
    delay_ms: int
    held: int = 0  # requests waiting out their delay now (status field)

    @property
    def child(self) -> BlockDevice:
        return self.ref.device

    @property
    def base(self) -> int:
        return self.start * SECTOR

    def status_table(self) -> DelayClassTable:
        return DelayClassTable(self.ref.key, self.start, self.delay_ms)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Delay(Target):
    name = "delay"
    version = (1, 3, 0)  # 6.1's

    def __init__(self, ctx: TargetContext, args: list[str], clock: Clock = MONOTONIC) -> None:
        super().__init__(ctx, args)
        self.clock = clock
        if len(args) not in (3, 6, 9):
            raise TargetError(f"Requires exactly 3, 6 or 9 arguments, got {len(args)}")
        # Each class has its own counter even when it borrows another's triple (as the
        # kernel constructs dc->read, dc->write and dc->flush separately).
        read_args = args[0:3]
        write_args = args[3:6] if len(args) >= 6 else read_args
        flush_args = args[6:9] if len(args) == 9 else write_args
        self.nargs = len(args)
        self.read = self._class(ctx, read_args)
        self.write = self._class(ctx, write_args)
        self.flush_class = self._class(ctx, flush_args)
        classes = [self.read, self.write, self.flush_class]
        self.classes = classes
        # No extents: a server skips reading holes, and every read here must reach this
        # target (to be delayed).
        self.caps = replace(combine_caps(c.child.caps for c in classes), extents=False)
        self.block_size = self.read.child.block_size
        self._may_delay = True
        self._waiting: set[asyncio.Future[None]] = set()

    @staticmethod
    def _class(ctx: TargetContext, args: list[str]) -> DelayClass:
        start = parse_uint(args[1], "Invalid device sector")
        delay_ms = parse_uint(args[2], "Invalid delay", 2**32 - 1)
        return DelayClass(ctx.device(args[0], start), start, delay_ms)

    def status_table(self) -> DelayTable:
        given = [c.status_table() for c in (self.read, self.write, self.flush_class)]
        return DelayTable(given[0], *given[1:self.nargs // 3])

    def status_info(self) -> DelayStatus:
        return DelayStatus(self.read.held, self.write.held, self.flush_class.held)

    def devices(self) -> list[DeviceRef]:
        return [c.ref for c in self.classes]

    async def _wait(self, cls: DelayClass) -> None:
        if not cls.delay_ms or not self._may_delay:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.clock.call_later(cls.delay_ms / 1000, functools.partial(_wake, fut))
        self._waiting.add(fut)
        cls.held += 1
        try:
            await fut
        finally:
            cls.held -= 1
            timer.cancel()
            self._waiting.discard(fut)

    async def presuspend(self, noflush: bool) -> None:
        self._may_delay = False
        for fut in list(self._waiting):
            _wake(fut)

    async def resume(self) -> None:
        self._may_delay = True

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._wait(self.read)
        await self.read.child.pread(buf, offset + self.read.base)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await self._wait(self.write)
        await self.write.child.pwrite(buf, offset + self.write.base, fua)

    async def flush(self) -> None:
        await self._wait(self.flush_class)
        if self.flush_class.child.caps.flush:
            await self.flush_class.child.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._wait(self.write)
        await self.write.child.trim(offset + self.write.base, length, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self._wait(self.write)
        await self.write.child.zero(offset + self.write.base, length, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        base = self.read.base
        return [Extent(e.offset - base, e.length, e.flags)
                for e in await self.read.child.extents(offset + base, length)]

    async def cache(self, offset: int, length: int) -> None:
        await self.read.child.cache(offset + self.read.base, length)
