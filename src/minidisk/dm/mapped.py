"""A mapped device: a `BlockDevice` with a live and an inactive table slot.

Semantics follow the kernel's dm-ioctl (include/uapi/linux/dm-ioctl.h):

- `load` puts a table in the inactive slot; the device need not be suspended, I/O goes on
  through the live table. `clear` drops the inactive table.
- `suspend` stops new I/O (it waits, queued, it does not fail), lets the target release
  anything it holds back, waits for in-flight I/O to finish and, unless `noflush`, flushes
  the live table so that everything acknowledged is on stable storage when it returns.
- `resume` swaps the inactive table in (suspending first if needed), hands back the old live
  table to be destroyed, and releases the queued I/O onto the new table. As in the kernel, a
  table swap is not an event: the counter moves when a target raises one.

The I/O path is the hot path: a flag test, a counter, one await of the table, or of the
child's device itself for reads and writes a target lets route (route.py). The counter exists
only so that a suspend can wait for it to reach zero.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass, replace

from minidisk.device.api import Extent
from minidisk.device.revocable import Revocable, shutdown_error
from minidisk.dm.mapping import Mapping
from minidisk.dm.route import RoutedIO
from minidisk.dm.stats import DeviceStats
from minidisk.dm.status import SegmentStatus, StatusType

EMPTY = Mapping()
DM_MAJOR = 253  # what Linux usually gives device-mapper; dmsetup shows it


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What `dmsetup info` shows, as data."""

    name: str
    uuid: str
    minor: int
    suspended: bool
    read_only: bool
    live_table: bool
    inactive_table: bool
    open_count: int
    event_nr: int
    target_count: int
    sectors: int
    deferred_remove: bool = False
    read_ahead: int = 256
    queued: int = 0  # requests waiting for a resume (what a test reads instead of sleeping)


class MappedDevice(RoutedIO, Revocable):
    """Also `Revocable` itself: it counts its requests anyway (for suspend), so the
    namespace need not wrap it -- one coroutine less on every request. Reads and writes,
    the routed calls, are `RoutedIO`'s (route.py)."""

    def __init__(self, name: str, minor: int, uuid: str = "", read_only: bool = False) -> None:
        self.name = name
        self.uuid = uuid
        self.minor = minor
        self.read_only = read_only
        self.live: Mapping = EMPTY
        self.has_live = False
        self.inactive: Mapping | None = None
        self.event_nr = 0
        self.open_count = 0
        self.removed = False
        self.deferred_remove = False  # remove --deferred while open (see Registry.remove)
        # What `info` shows as Read Ahead: the kernel's default for a new block device, in
        # sectors, until `--readahead` sets it (we read ahead nothing ourselves).
        self.read_ahead = 256
        # dm-stats regions (@stats_* messages); counting wraps the I/O methods only while
        # a region exists (stats.py), so the I/O path below is as it is without them.
        self.stats = DeviceStats()
        # What setgeometry set (cylinders, heads, sectors, start), as the kernel keeps it.
        self.geometry: tuple[int, int, int, int] | None = None
        self._apply(EMPTY)
        # `_blocked` (suspended or revoked) is tested on every request; `_resumed` releases
        # the requests queued behind it.
        self._suspended = False
        self.revoked = False
        self._blocked = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._inflight = 0
        self._queued = 0  # requests in _wait_resumed
        self._idle: asyncio.Event | None = None
        self._event_changed = asyncio.Event()

    @property
    def mapper_key(self) -> str:
        """The namespace key; tables that hold this device print it (see DeviceRef)."""
        return f"/dev/mapper/{self.name}"

    @property
    def dm_devno(self) -> tuple[int, int]:
        """The device number tables above print for this device, as the kernel's."""
        return DM_MAJOR, self.minor

    @property
    def suspended(self) -> bool:
        return self._suspended

    def _apply(self, mapping: Mapping) -> None:
        self.live = mapping
        self.size = mapping.size
        self._route_to(mapping)
        caps = mapping.caps
        if self.read_only and not caps.read_only:
            caps = replace(caps, read_only=True, fua=False, trim=False, zero=False,
                           fast_zero=False)
        self.caps = caps
        self.block_size = mapping.block_size

    # Open counting: tables that hold this device, and clients (the server calls these).

    def open(self) -> None:
        self.open_count += 1

    def release(self) -> None:
        if self.open_count <= 0:
            raise RuntimeError(f"{self.name}: release without open")
        self.open_count -= 1

    # Events

    def raise_event(self) -> None:
        self.event_nr += 1
        self._event_changed.set()
        self._event_changed = asyncio.Event()

    async def wait_event(self, after: int) -> int:
        """Return the event number once it is greater than `after`."""
        while self.event_nr <= after:
            if self.removed:
                raise OSError(errno.ENXIO, f"{self.name} was removed")
            await self._event_changed.wait()
        return self.event_nr

    # Table slots and suspension

    def load(self, mapping: Mapping) -> Mapping | None:
        """Put `mapping` in the inactive slot; return the table it replaced (to destroy)."""
        old, self.inactive = self.inactive, mapping
        return old

    def clear(self) -> Mapping | None:
        old, self.inactive = self.inactive, None
        return old

    async def suspend(self, noflush: bool = False) -> None:
        if self._suspended:
            return
        self._suspended = self._blocked = True
        self._resumed.clear()
        live = self.live
        await live.presuspend(noflush)
        await self._wait_idle()
        if not noflush and self.has_live:
            await live.flush()

    def swap_tables(self) -> Mapping | None:
        """dm_swap_table, on a suspended device: the inactive table goes live, before its
        targets' preresume (`resume`); returns the table it replaced."""
        assert self._suspended and self.inactive is not None
        new, self.inactive = self.inactive, None
        old = self.live if self.has_live else None
        self._apply(new)
        self.has_live = True
        return old

    async def resume(self) -> None:
        """Resume the live table's targets and let I/O through. A target that refuses
        (its preresume) leaves the device suspended; a later resume tries again."""
        if self._suspended and self.has_live:
            await self.live.resume()
        self._suspended = False
        self._blocked = self.revoked
        self._resumed.set()

    def take_tables(self) -> list[Mapping]:
        """For removal: empty both slots and fail queued I/O; return the tables to destroy."""
        tables = [m for m in (self.live if self.has_live else None, self.inactive) if m]
        self.inactive = None
        self.has_live = False
        self._apply(EMPTY)
        self.removed = True
        self._suspended = False
        self._blocked = self.revoked
        self._resumed.set()
        self._event_changed.set()
        return tables

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            name=self.name, uuid=self.uuid, minor=self.minor, suspended=self._suspended,
            read_only=self.read_only, live_table=self.has_live,
            inactive_table=self.inactive is not None, open_count=self.open_count,
            event_nr=self.event_nr, target_count=len(self.live) if self.has_live else 0,
            sectors=self.live.sectors, deferred_remove=self.deferred_remove,
            read_ahead=self.read_ahead, queued=self._queued)

    def status_data(self, kind: StatusType = StatusType.INFO, inactive: bool = False
                    ) -> list[SegmentStatus]:
        """The live (or inactive) table's segments with their INFO or TABLE status as data:
        what `dmsetup status` and `dmsetup table` print, for programs. No table: none."""
        mapping = self.inactive if inactive else self.live if self.has_live else None
        return mapping.status_data(kind) if mapping is not None else []

    # I/O

    async def _wait_resumed(self) -> None:
        while self._blocked:
            if self.revoked:
                raise shutdown_error()
            self._queued += 1
            try:
                await self._resumed.wait()
            finally:
                self._queued -= 1
        if self.removed:
            raise OSError(errno.ENXIO, f"{self.name} was removed")

    def _done(self) -> None:
        """After every request (in `finally`): a request that was in flight when the device
        was revoked fails too, whatever its outcome."""
        self._inflight -= 1
        if not self._inflight and self._idle is not None:
            self._idle.set()
        if self.revoked:
            raise shutdown_error()

    async def _wait_idle(self) -> None:
        """Until no request is inside (suspend and close may both be waiting)."""
        while self._inflight:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    # Revocation (what the namespace does on a forced removal of /dev/mapper/NAME)

    def revoke(self) -> None:
        self.revoked = self._blocked = True
        self._resumed.set()  # queued requests wake up and fail

    async def close(self) -> None:
        """Revoke and wait for requests in flight. The tables stay: the registry owns them
        and destroys them when the device is removed."""
        self.revoke()
        await self._wait_idle()

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.name} is read-only")

    async def flush(self) -> None:
        if self._blocked:
            await self._wait_resumed()
        self._inflight += 1
        try:
            await self.live.flush()
        finally:
            self._done()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self._blocked:
            await self._wait_resumed()
        self._check_writable()
        self._inflight += 1
        try:
            await self.live.trim(offset, length, fua)
        finally:
            self._done()

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        if self._blocked:
            await self._wait_resumed()
        self._check_writable()
        self._inflight += 1
        try:
            await self.live.zero(offset, length, may_trim, fast, fua)
        finally:
            self._done()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if self._blocked:
            await self._wait_resumed()
        self._inflight += 1
        try:
            return await self.live.extents(offset, length)
        finally:
            self._done()

    async def cache(self, offset: int, length: int) -> None:
        if self._blocked:
            await self._wait_resumed()
        self._inflight += 1
        try:
            await self.live.cache(offset, length)
        finally:
            self._done()

    def describe(self) -> str:
        state = "revoked" if self.revoked else "suspended" if self._suspended else "active"
        return f"dm {self.name} ({state}, {len(self.live)} targets, {self.live.sectors} sectors)"
