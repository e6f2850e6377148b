"""`linear <dev> <offset>`: a window of one device (DOC/linear.rst).

The hot path of LVM-style layouts, so each operation is one addition and one await.
"""

from __future__ import annotations

from minidisk.device.api import Extent
from minidisk.dm.table import SECTOR
from minidisk.dm.target import (
    DeviceRef,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
    parse_uint,
)


class Linear(Target):
    name = "linear"
    version = (1, 4, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) != 2:
            raise TargetError("Invalid argument count: expected <dev> <offset>")
        self.start = parse_uint(args[1], "Invalid device sector")
        self.ref = ctx.device(args[0], self.start)
        self.child = self.ref.device
        self.base = self.start * SECTOR
        self.caps = combine_caps([self.child.caps])
        self.block_size = self.child.block_size

    def table_args(self) -> list[str]:
        return [self.ref.key, str(self.start)]

    def devices(self) -> list[DeviceRef]:
        return [self.ref]

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, offset + self.base)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await self.child.pwrite(buf, offset + self.base, fua)

    async def flush(self) -> None:
        if self.child.caps.flush:
            await self.child.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.child.trim(offset + self.base, length, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self.child.zero(offset + self.base, length, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        base = self.base
        return [Extent(e.offset - base, e.length, e.flags)
                for e in await self.child.extents(offset + base, length)]

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset + self.base, length)
