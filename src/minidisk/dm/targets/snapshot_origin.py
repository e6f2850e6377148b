"""snapshot-origin (dm-snapshot's origin target): reads pass through; every write, discard
or zero is cut at the split boundary of the origin's snapshots (set at resume, as
origin_resume does) and each piece copies its chunk out to every snapshot first."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from minidisk.dm.snapshot_origins import (
    NO_SPLIT,
    SECTOR,
    Origin,
    hold_origin,
    open_device,
    release_origin,
    split,
)
from minidisk.dm.status_table import SnapshotOriginTable
from minidisk.dm.target import (
    DeviceRef,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
    flush_device,
)


class SnapshotOrigin(Target):
    name = "snapshot-origin"
    version = (1, 9, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) != 1:
            raise TargetError("origin: incorrect number of arguments")
        self.ref = open_device(ctx, args[0], None, "Cannot get target device")
        self.child = self.ref.device
        self.caps = replace(combine_caps([self.child.caps]), extents=False,
                            fast_zero=False)
        self.block_size = self.child.block_size
        self.origin: Origin | None = None
        self.boundary = NO_SPLIT * SECTOR  # set at resume, as origin_resume's split_boundary

    async def prepare(self) -> None:
        self.origin = hold_origin(self.child)

    async def resume(self) -> None:
        self.boundary = self._origin().split_boundary()

    async def destroy(self) -> None:
        if self.origin is not None:
            release_origin(self.origin)
            self.origin = None

    def status_table(self) -> SnapshotOriginTable:
        return SnapshotOriginTable(self.ref.key)

    def devices(self) -> list[DeviceRef]:
        return [self.ref]

    def _origin(self) -> Origin:
        assert self.origin is not None, "a live table has been prepared"
        return self.origin

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        origin, child = self._origin(), self.child
        for at, pos, n in split(offset, len(buf), self.boundary):
            piece = buf[pos:pos + n]
            await origin.write(at, partial(child.pwrite, piece, at, fua))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # A discard is a write to the origin: the snapshots keep the old data.
        origin, child = self._origin(), self.child
        for at, _, n in split(offset, length, self.boundary):
            await origin.write(at, partial(child.trim, at, n, fua))

    async def zero(self, offset: int, length: int, may_trim: bool = False,
                   fast: bool = False, fua: bool = False) -> None:
        origin, child = self._origin(), self.child
        for at, _, n in split(offset, length, self.boundary):
            await origin.write(at, partial(child.zero, at, n, may_trim, fast, fua))

    async def flush(self) -> None:
        await flush_device(self.child)

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

