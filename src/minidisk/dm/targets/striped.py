"""`striped <#stripes> <chunk_sectors> [<dev> <offset>]...` (MD/dm-stripe.c).

Mapping, the kernel's `stripe_map_sector` in bytes::

    chunk, in_chunk = divmod(offset, chunk_size)
    row, stripe = divmod(chunk, stripes)
    device offset = row * chunk_size + in_chunk + stripe start

`_locate` computes it; `route`, the fast path's copy, inlines it. A request inside one chunk
(the common case when the chunk is at least the I/O size) costs two divmods and one await;
longer ones are cut at chunk boundaries and issued in order.
A stripe that fails I/O shows as `D` in status and raises an event, at most 15 times
(DM_IO_ERROR_THRESHOLD), as the kernel does.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from minidisk.device.api import BlockDevice, Extent, add_holes, pread_sparse_at
from minidisk.dm.route import Hop, unwrap
from minidisk.dm.status import StripedStatus
from minidisk.dm.status_table import Stripe, StripedTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import (
    DeviceRef,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
    parse_uint,
)

ERROR_EVENT_THRESHOLD = 15
# Errors that say something about the request rather than the stripe's health.
_NOT_DEVICE_ERRORS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSPC})


class Striped(Target):
    name = "striped"
    version = (1, 6, 0)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) < 2:
            raise TargetError("Not enough arguments: expected <#stripes> <chunk_sectors> ...")
        stripes = parse_uint(args[0], "Invalid stripe count", 2**31)
        if stripes == 0:
            raise TargetError("Invalid stripe count: 0")
        self.chunk_sectors = parse_uint(args[1], "Invalid chunk_size", 2**32 - 1)
        if self.chunk_sectors == 0:
            raise TargetError("Invalid chunk_size: 0")
        width, rest = divmod(ctx.length, stripes)
        if rest:
            raise TargetError(
                f"Target length {ctx.length} not divisible by number of stripes {stripes}")
        if width % self.chunk_sectors:
            raise TargetError(
                f"Target length {ctx.length} not divisible by chunk size "
                f"{self.chunk_sectors} per stripe")
        if len(args) != 2 + 2 * stripes:
            raise TargetError(
                f"Not enough destinations specified: {stripes} stripes need "
                f"{2 * stripes} <dev> <offset> arguments, got {len(args) - 2}")
        self.starts: list[int] = []
        self.refs: list[DeviceRef] = []
        for i in range(stripes):
            start = parse_uint(args[3 + 2 * i], "Invalid stripe offset")
            self.refs.append(ctx.device(args[2 + 2 * i], start, width))
            self.starts.append(start)
        self.stripes = stripes
        self.chunk = self.chunk_sectors * SECTOR
        self.children: list[BlockDevice] = [r.device for r in self.refs]
        self.bases = [s * SECTOR for s in self.starts]
        # Where `route` sends a one-chunk request: past each child's revocable wrapper.
        self.hops = [(*unwrap(child), base)
                     for child, base in zip(self.children, self.bases, strict=True)]
        self.error_counts = [0] * stripes
        self.raise_event = ctx.raise_event
        self.caps = combine_caps(c.caps for c in self.children)
        self.routable = self.caps.extents
        self.block_size = self.children[0].block_size

    def status_table(self) -> StripedTable:
        return StripedTable(self.stripes, self.chunk_sectors, tuple(
            Stripe(ref.key, start) for ref, start in zip(self.refs, self.starts, strict=True)))

    def status_info(self) -> StripedStatus:
        return StripedStatus(self.stripes, tuple(r.key for r in self.refs),
                             "".join("D" if n else "A" for n in self.error_counts))

    def devices(self) -> list[DeviceRef]:
        return list(self.refs)

    def _failed(self, stripe: int, e: OSError) -> None:
        if e.errno in _NOT_DEVICE_ERRORS:
            return
        self.error_counts[stripe] += 1
        if self.error_counts[stripe] < ERROR_EVENT_THRESHOLD:
            self.raise_event()

    def _locate(self, offset: int) -> tuple[int, int, int]:
        """(stripe, device offset, bytes left in the chunk) of the byte at `offset`: the
        module docstring's formula, which every path but `route` takes from here."""
        chunk = self.chunk
        chunk_no, in_chunk = divmod(offset, chunk)
        row, stripe = divmod(chunk_no, self.stripes)
        return stripe, row * chunk + in_chunk + self.bases[stripe], chunk - in_chunk

    def route(self, offset: int, length: int) -> Hop | None:
        """A request inside one chunk, as most small ones are, goes straight to its stripe."""
        # `_locate`, inlined and in separate operators (divmod's tuple costs more): this runs
        # for every routed request (route.py).
        chunk = self.chunk
        in_chunk = offset % chunk
        if in_chunk + length > chunk:
            return None
        chunk_no = offset // chunk
        stripe = chunk_no % self.stripes
        gate, inner, base = self.hops[stripe]
        return gate, inner, chunk_no // self.stripes * chunk + in_chunk + base, stripe

    def route_failed(self, tag: int, error: OSError) -> None:
        self._failed(tag, error)

    def pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(stripe, device offset, position in request, bytes) for each chunk touched."""
        pos = 0
        while pos < length:
            stripe, at, left = self._locate(offset + pos)
            n = min(left, length - pos)
            yield stripe, at, pos, n
            pos += n

    # pread, pread_sparse and pwrite call a request inside one chunk (what a table of more
    # than one segment, or an unroutable striped target, sends most) without the generator.

    async def pread(self, buf: memoryview, offset: int) -> None:
        stripe, at, left = self._locate(offset)
        if len(buf) <= left:
            try:
                await self.children[stripe].pread(buf, at)
            except OSError as e:
                self._failed(stripe, e)
                raise
            return
        for stripe, dev_off, pos, n in self.pieces(offset, len(buf)):
            try:
                await self.children[stripe].pread(buf[pos:pos + n], dev_off)
            except OSError as e:
                self._failed(stripe, e)
                raise

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        stripe, at, left = self._locate(offset)
        if len(buf) <= left and self.caps.extents:
            # Our caps were combined from the children's, so each child tells holes too.
            try:
                found = await self.children[stripe].pread_sparse(buf, at)
            except OSError as e:
                self._failed(stripe, e)
                raise
            if found and at != offset:
                found = [(start + offset - at, size) for start, size in found]
            return found
        holes: list[tuple[int, int]] = []
        for stripe, dev_off, pos, n in self.pieces(offset, len(buf)):
            try:
                add_holes(holes, await pread_sparse_at(
                    self.children[stripe], buf[pos:pos + n], dev_off,
                    offset + pos - dev_off))
            except OSError as e:
                self._failed(stripe, e)
                raise
        return holes

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        stripe, at, left = self._locate(offset)
        if len(buf) <= left:
            try:
                await self.children[stripe].pwrite(buf, at, fua)
            except OSError as e:
                self._failed(stripe, e)
                raise
            return
        for stripe, dev_off, pos, n in self.pieces(offset, len(buf)):
            try:
                await self.children[stripe].pwrite(buf[pos:pos + n], dev_off, fua)
            except OSError as e:
                self._failed(stripe, e)
                raise

    async def flush(self) -> None:
        # Flush fans out to every stripe (the kernel sends num_flush_bios = #stripes).
        for i, child in enumerate(self.children):
            if child.caps.flush:
                try:
                    await child.flush()
                except OSError as e:
                    self._failed(i, e)
                    raise

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        for stripe, dev_off, _, n in self.pieces(offset, length):
            await self.children[stripe].trim(dev_off, n, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        for stripe, dev_off, _, n in self.pieces(offset, length):
            await self.children[stripe].zero(dev_off, n, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for stripe, dev_off, pos, n in self.pieces(offset, length):
            end = offset + pos + n
            stop = offset + pos
            for e in await self.children[stripe].extents(dev_off, n):
                start = offset + pos + (e.offset - dev_off)
                stop = min(start + e.length, end)
                if out and out[-1].flags == e.flags and out[-1].offset + out[-1].length == start:
                    prev = out.pop()
                    out.append(Extent(prev.offset, stop - prev.offset, e.flags))
                else:
                    out.append(Extent(start, stop - start, e.flags))
            if stop < end:  # a short answer from a stripe: later pieces would leave a gap
                break
        return out

    async def cache(self, offset: int, length: int) -> None:
        for stripe, dev_off, _, n in self.pieces(offset, length):
            await self.children[stripe].cache(dev_off, n)
