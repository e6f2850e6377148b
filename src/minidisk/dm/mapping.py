"""A constructed table: segments turned into targets, and requests split between them.

`build_mapping` applies the load rules that need targets and devices (unknown target type,
constructor arguments, device areas, singleton targets); `table.parse_table` has already
checked the layout. A failed build closes every device it opened, so a bad table leaves
nothing held.

Requests arrive in bytes from the mapped device. With one segment (the usual case) they go
straight to its target; otherwise they are cut at segment boundaries.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterator, Sequence

from minidisk.device.api import MAX_REQUEST, BlockSize, Caps, Extent, add_holes, pread_sparse_at
from minidisk.dm.status import SegmentStatus, StatusType
from minidisk.dm.table import SECTOR, Segment, TableError
from minidisk.dm.target import (
    DeviceRef,
    Opener,
    Target,
    TargetContext,
    TargetError,
    combine_caps,
)

TableLine = tuple[int, int, str, list[str]]


def _out_of_range(offset: int, length: int, size: int) -> OSError:
    return OSError(errno.EIO, f"request {offset}+{length} beyond the end of the table ({size})")


class Mapping:
    def __init__(self, segments: Sequence[Segment] = (), targets: Sequence[Target] = (),
                 contexts: Sequence[TargetContext] = ()) -> None:
        self.segments = list(segments)
        self.targets = list(targets)
        self._contexts = list(contexts)
        self.sectors = self.segments[-1].end if self.segments else 0
        self.size = self.sectors * SECTOR
        self._starts = [s.start * SECTOR for s in self.segments]
        self._only = self.targets[0] if len(self.targets) == 1 else None
        self.caps = _table_caps(self.targets)
        self.block_size = _table_block_size(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def target_types(self) -> set[str]:
        return {t.name for t in self.targets}

    def immutable_type(self) -> str | None:
        return next((t.name for t in self.targets if t.immutable), None)

    def table_lines(self) -> list[TableLine]:
        return [(s.start, s.length, t.name, t.table_args())
                for s, t in zip(self.segments, self.targets, strict=True)]

    def status_lines(self) -> list[tuple[int, int, str, str]]:
        return [(s.start, s.length, t.name, t.status())
                for s, t in zip(self.segments, self.targets, strict=True)]

    def status_data(self, kind: StatusType) -> list[SegmentStatus]:
        """Each segment's INFO or TABLE status as data (what the lines above print)."""
        return [SegmentStatus(s.start, s.length, t.name, t.status_data(kind))
                for s, t in zip(self.segments, self.targets, strict=True)]

    def devices(self) -> list[DeviceRef]:
        """Every child device once, in table order."""
        seen: dict[int, DeviceRef] = {}
        for t in self.targets:
            for ref in t.devices():
                seen.setdefault(id(ref.device), ref)
        return list(seen.values())

    def target_at(self, sector: int) -> Target:
        if not 0 <= sector < self.sectors:
            raise OSError(errno.EINVAL, "Target message sector outside device")
        return self.targets[bisect.bisect_right(self._starts, sector * SECTOR) - 1]

    def pieces(self, offset: int, length: int) -> Iterator[tuple[Target, int, int, int]]:
        """(target, offset in target, position in request, bytes) per segment touched."""
        if offset < 0 or offset + length > self.size:
            raise _out_of_range(offset, length, self.size)
        i = bisect.bisect_right(self._starts, offset) - 1
        pos = 0
        while pos < length:
            target, start = self.targets[i], self._starts[i]
            inside = offset + pos - start
            n = min(target.size - inside, length - pos)
            yield target, inside, pos, n
            pos += n
            i += 1

    # I/O: the single-segment path first, without a generator.

    async def pread(self, buf: memoryview, offset: int) -> None:
        only = self._only
        if only is not None and offset + len(buf) <= self.size:
            await only.pread(buf, offset)
            return
        for target, at, pos, n in self.pieces(offset, len(buf)):
            await target.pread(buf[pos:pos + n], at)

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        only = self._only
        if only is not None and offset + len(buf) <= self.size:
            return await pread_sparse_at(only, buf, offset, 0)
        holes: list[tuple[int, int]] = []
        for target, at, pos, n in self.pieces(offset, len(buf)):
            add_holes(holes, await pread_sparse_at(target, buf[pos:pos + n], at,
                                                   offset + pos - at))
        return holes

    async def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        only = self._only
        if only is not None and offset + len(buf) <= self.size:
            await only.pwrite(buf, offset, fua)
            return
        for target, at, pos, n in self.pieces(offset, len(buf)):
            await target.pwrite(buf[pos:pos + n], at, fua)

    async def flush(self) -> None:
        for target in self.targets:
            await target.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        for target, at, _, n in self.pieces(offset, length):
            await target.trim(at, n, fua)

    async def zero(self, offset: int, length: int, may_trim: bool, fast: bool,
                   fua: bool) -> None:
        for target, at, _, n in self.pieces(offset, length):
            await target.zero(at, n, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for target, at, pos, n in self.pieces(offset, length):
            base = offset + pos - at
            got = 0
            for e in await target.extents(at, n):
                start, stop = base + e.offset, min(base + e.offset + e.length, offset + pos + n)
                got = stop - (offset + pos)
                if out and out[-1].flags == e.flags and out[-1].offset + out[-1].length == start:
                    start = out.pop().offset
                out.append(Extent(start, stop - start, e.flags))
            if got < n:  # a short answer: stop rather than leave a gap
                break
        return out

    async def cache(self, offset: int, length: int) -> None:
        for target, at, _, n in self.pieces(offset, length):
            await target.cache(at, n)

    # Lifecycle

    async def presuspend(self, noflush: bool) -> None:
        for target in self.targets:
            await target.presuspend(noflush)

    async def resume(self) -> None:
        for target in self.targets:
            await target.resume()

    async def destroy(self) -> None:
        try:
            for target in self.targets:
                await target.destroy()
        finally:
            for ctx in self._contexts:
                ctx.close_all()
            self._contexts.clear()


def _table_caps(targets: Sequence[Target]) -> Caps:
    # Each target's caps already say what forwarding to it offers; a table offers what all
    # of its targets do (and an empty table only a flush, of nothing).
    return combine_caps(t.caps for t in targets) if targets else Caps(flush=True)


def _table_block_size(targets: Sequence[Target]) -> BlockSize:
    """Sector-granular, like every dm device; larger if a child needs larger."""
    minimum = max([SECTOR, *(t.block_size.minimum for t in targets)])
    preferred = max([4096, minimum, *(t.block_size.preferred for t in targets)])
    return BlockSize(minimum, preferred, max(MAX_REQUEST, preferred))


def build_mapping(
    segments: Sequence[Segment], types: dict[str, type[Target]], open_device: Opener,
    raise_event: Callable[[], None],
    read_only: bool = False,
) -> Mapping:
    """Construct every segment's target; on any error close what was opened and raise."""
    if not segments:
        raise TableError("empty table: a table needs at least one segment")
    targets: list[Target] = []
    contexts: list[TargetContext] = []
    try:
        for seg in segments:
            kind = types.get(seg.target)
            if kind is None:
                raise seg.error(f"unknown target type {seg.target!r}")
            if kind.singleton and len(segments) > 1:
                raise seg.error(f"{seg.target} target must be the only segment in its table")
            ctx = TargetContext(seg.length, open_device, raise_event, read_only)
            contexts.append(ctx)
            try:
                targets.append(kind(ctx, list(seg.args)))
            except TargetError as e:
                raise seg.error(f"{seg.target}: {e}", e.errno) from None
    except BaseException:
        for ctx in contexts:
            ctx.close_all()
        raise
    return Mapping(segments, targets, contexts)
