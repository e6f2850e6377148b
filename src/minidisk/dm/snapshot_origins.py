"""The origin side of dm-snapshot: every origin device with snapshots on it (the kernel's
_origins hash), the split boundary its writes are cut at, the copy-out to each snapshot that
precedes an origin write, and the per-chunk request counts snapshots and merges wait on.
Shared by the snapshot-origin target (targets/snapshot_origin.py) and the snapshot and
snapshot-merge targets (targets/snapshot.py)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from minidisk.device.api import BlockDevice
from minidisk.dm.route import unwrap
from minidisk.dm.target import DeviceRef, TargetContext, TargetError

if TYPE_CHECKING:
    from minidisk.dm.targets.snapshot import Snapshot

SECTOR = 512
NO_SPLIT = 2**31  # rounddown_pow_of_two(UINT_MAX): the split boundary with no snapshots


def split(offset: int, length: int, boundary: int) -> Iterator[tuple[int, int, int]]:
    """(offset, position in request, bytes) of each piece of a request cut at multiples of
    `boundary` bytes (dm_accept_partial_bio at a target's split boundary)."""
    pos = 0
    while pos < length:
        n = min(boundary - (offset + pos) % boundary, length - pos)
        yield offset + pos, pos, n
        pos += n



def identity(device: BlockDevice) -> BlockDevice:
    """The device itself, under a namespace wrapper: what the kernel's bdev compare is."""
    return unwrap(device)[1]


class ChunkCounts:
    """Requests in flight per chunk, and a wait for a chunk to have none (the kernel's
    tracked chunks)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self._changed = asyncio.Event()

    def enter(self, chunk: int) -> None:
        self.counts[chunk] = self.counts.get(chunk, 0) + 1

    def leave(self, chunk: int) -> None:
        left = self.counts[chunk] - 1
        if left:
            self.counts[chunk] = left
        else:
            del self.counts[chunk]
            self._changed.set()
            self._changed = asyncio.Event()

    async def drained(self, first: int, count: int = 1) -> None:
        while any(c in self.counts for c in range(first, first + count)):
            await self._changed.wait()


class Origin:
    """One origin device: its snapshots (largest chunk size first, as the kernel keeps
    them) and a gate for its writes, which a snapshot's activation closes while it waits
    for those in flight."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self.snapshots: list[Snapshot] = []
        self.users = 0  # snapshot-origin targets and snapshots holding this record
        self.writes = 0
        self._quiesced = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    def insert(self, snap: Snapshot) -> None:
        if snap in self.snapshots:
            self.snapshots.remove(snap)
        at = next((i for i, s in enumerate(self.snapshots)
                   if s.store.chunk_size < snap.store.chunk_size), len(self.snapshots))
        self.snapshots.insert(at, snap)

    def split_boundary(self) -> int:
        """The smallest chunk size of the snapshots, in bytes (2^31 sectors if none)."""
        return SECTOR * min((s.store.chunk_size for s in self.snapshots
                             if s.store.chunk_size), default=NO_SPLIT)

    async def write(self, offset: int, action: Callable[[], Awaitable[None]]) -> None:
        """Copy the chunk at `offset` out to the snapshots, then run `action` (a write that
        its caller has split at a split boundary)."""
        while not self._open.is_set():
            await self._open.wait()
        self.writes += 1
        self._idle.clear()
        try:
            await self.copy_out(offset)
            await action()
        finally:
            self.writes -= 1
            if not self.writes:
                self._idle.set()

    async def copy_out(self, offset: int) -> None:
        for snap in list(self.snapshots):
            # A merging snapshot has in effect been deleted: it gets no new exceptions.
            if snap.merge or not snap.active or not snap.valid or offset >= snap.size:
                continue
            await snap.exception_for_origin(offset // snap.store.chunk_bytes)

    async def quiesce(self, action: Callable[[], Awaitable[None] | None]) -> None:
        """Hold new origin writes, wait for those in flight, run `action`, reopen."""
        self._quiesced += 1
        self._open.clear()
        try:
            while self.writes:
                await self._idle.wait()
            result = action()
            if result is not None:
                await result
        finally:
            self._quiesced -= 1
            if not self._quiesced:
                self._open.set()


# Every origin device with a snapshot or a snapshot-origin target on it (the kernel's
# _origins hash): keyed by the device, whichever mapped device's table opened it.
_ORIGINS: dict[int, Origin] = {}


def hold_origin(device: BlockDevice) -> Origin:
    dev = identity(device)
    origin = _ORIGINS.get(id(dev))
    if origin is None:
        origin = _ORIGINS[id(dev)] = Origin(dev)
    origin.users += 1
    return origin


def release_origin(origin: Origin) -> None:
    origin.users -= 1
    if not origin.users and _ORIGINS.get(id(origin.device)) is origin:
        del _ORIGINS[id(origin.device)]



def open_device(ctx: TargetContext, key: str, length: int | None, lookup_error: str) -> DeviceRef:
    try:
        return ctx.device(key, 0, length)
    except TargetError as e:
        if e.errno == errno.ENODEV:
            raise TargetError(lookup_error, errno.ENODEV) from None
        raise

