"""The set of mapped devices and the dmsetup lifecycle over it.

One `Registry` per server. It resolves table device keys (`/dev/mapper/NAME` itself, the
rest through a `DeviceSource`), publishes each mapped device under `/dev/mapper/NAME`, and
implements create, load, suspend, resume, clear, remove, rename, info, deps, table,
status, wait and message with the kernel's rules and errnos:

- ENXIO for a device that does not exist, EBUSY for a name in use or a device still open,
  EINVAL (a `TableError`, which is a ValueError) for a table the load rules refuse.
- A table is built completely before it touches the device, so a refused table leaves the
  device exactly as it was.
- A table may not make a device hold itself, directly or through other mapped devices.
- `remove --deferred` of an open device marks it instead (the kernel's DM_DEFERRED_REMOVE),
  and it is removed once its last user lets go: a table above it being destroyed, or its
  last NBD client disconnecting. The message `@cancel_deferred_remove` unmarks it.

Operations on one device run one at a time (its lock); `wait` and I/O do not take it, and
devices do not wait for each other, so a suspend stuck behind a suspended lower device
never blocks the resume that frees it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from minidisk.device.api import BlockDevice
from minidisk.dm.devices import MAPPER_PREFIX, DeviceSource, Publisher
from minidisk.dm.mapped import DM_MAJOR, DeviceInfo, MappedDevice
from minidisk.dm.mapping import Mapping, TableLine, build_mapping
from minidisk.dm.stats import MESSAGES as STATS_MESSAGES
from minidisk.dm.status import SegmentStatus, StatusType
from minidisk.dm.table import Segment, TableError, parse_table
from minidisk.dm.target import Opener, Target, TargetError
from minidisk.dm.targets import TARGET_TYPES

DRIVER_VERSION = (4, 47, 0)  # Linux 6.1's, whose targets' versions and texts we match
MAX_NAME = 127  # DM_NAME_LEN - 1
MAX_MINOR = (1 << 20) - 1  # MINORMASK

log = logging.getLogger(__name__)
_DEVNO = re.compile(r"(\d+):(\d+)")


def no_device(name: str) -> OSError:
    return OSError(errno.ENXIO, f"device {name} does not exist")


def check_name(name: str) -> None:
    if not name or len(name) > MAX_NAME or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"invalid device name {name!r}")


@dataclass(frozen=True, slots=True)
class Dependency:
    key: str  # the namespace key
    mapped: MappedDevice | None  # set when the dependency is itself a mapped device
    devno: tuple[int, int] | None = None  # the key's number, if it has one


class Registry:
    def __init__(
        self, source: DeviceSource | None = None, publisher: Publisher | None = None,
        types: dict[str, type[Target]] | None = None,
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.types = dict(TARGET_TYPES if types is None else types)
        self.devices: dict[str, MappedDevice] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None  # runs while devices are marked
        # A table or the last NBD client let go of a device marked for deferred removal.
        self._released = asyncio.Event()
        # Asked with (the loading device's key, a child's key, the child) before a table maps
        # it; raising refuses the table (the link layer: no table over a governed disk).
        self.child_checks: list[Callable[[str, str, BlockDevice], None]] = []
        if publisher is not None:
            publisher.on_unused(self._key_unused)

    # Lookup

    def get(self, name: str) -> MappedDevice:
        try:
            return self.devices[name]
        except KeyError:
            raise no_device(name) from None

    def name_of_uuid(self, uuid: str) -> str:
        """The device with this UUID (dmsetup -u); devices without one never match."""
        for dev in self.devices.values():
            if uuid and dev.uuid == uuid:
                return dev.name
        raise OSError(errno.ENXIO, f"no device has uuid {uuid!r}")

    def name_of_devno(self, major: int, minor: int) -> str:
        """The device with this number (dmsetup -j/-m, a table's MAJOR:MINOR), as `info`
        prints it."""
        if major == DM_MAJOR:
            for dev in self.devices.values():
                if dev.minor == minor:
                    return dev.name
        raise OSError(errno.ENXIO, f"no device has number {major}:{minor}")

    def _lock(self, dev: MappedDevice) -> asyncio.Lock:
        return self._locks.setdefault(id(dev), asyncio.Lock())

    # Device resolution for tables

    def _opener(self, loading: MappedDevice) -> Opener:
        def open_device(key: str) -> tuple[BlockDevice, Callable[[], None],
                                            tuple[int, int] | None]:
            number = _DEVNO.fullmatch(key)
            if number is not None:  # MAJOR:MINOR, as the kernel takes (and prints) them
                major, minor = int(number[1]), int(number[2])
                if major == DM_MAJOR:
                    key = MAPPER_PREFIX + self.name_of_devno(major, minor)
                elif self.source is not None:
                    key = self.source.key_of_devno(major, minor)
            if key.startswith(MAPPER_PREFIX):
                child = self.get(key[len(MAPPER_PREFIX):])
                if child is loading or self._reaches(child, loading):
                    raise OSError(errno.ELOOP,
                                  f"{loading.name} would hold itself through {key}")
                self._check_child(loading, key, child)
                child.open()
                return child, lambda: self._release(child), None
            if self.source is None:
                raise OSError(errno.ENOENT, f"no namespace to look up {key}")
            device = self.source.lookup(key)
            self._check_child(loading, key, device)
            return device, self.source.hold(key).release, self.source.devno(key)

        return open_device

    def _check_child(self, loading: MappedDevice, key: str, child: BlockDevice) -> None:
        for check in self.child_checks:
            check(loading.mapper_key, key, child)

    def _release(self, dev: MappedDevice) -> None:
        dev.release()
        if dev.deferred_remove and not dev.open_count:
            self._released.set()

    def _reaches(self, start: MappedDevice, goal: MappedDevice) -> bool:
        """Does `start` hold `goal` through its tables (live or inactive), at any depth?"""
        seen: set[int] = set()
        todo = [start]
        while todo:
            dev = todo.pop()
            if dev is goal:
                return True
            if id(dev) in seen:
                continue
            seen.add(id(dev))
            for mapping in (dev.live, dev.inactive):
                if mapping is not None:
                    todo += [r.device for r in mapping.devices()
                             if isinstance(r.device, MappedDevice)]
        return False

    # Lifecycle

    def _free_minor(self, wanted: int | None) -> int:
        """The kernel's choice (idr_alloc): the lowest minor not in use, so freed minors
        are handed out again; a wanted one (create -j/-m) only if free (ENXIO, as 6.1's
        create fails, if not)."""
        used = {d.minor for d in self.devices.values()}
        if wanted is not None:
            if wanted in used or wanted > MAX_MINOR:
                raise OSError(errno.ENXIO, f"minor {wanted} is in use")
            return wanted
        return next(m for m in range(len(used) + 1) if m not in used)

    async def create(self, name: str, table: str | None = None, uuid: str = "",
                     read_only: bool = False, minor: int | None = None) -> MappedDevice:
        """dmsetup create: a new device, and with a table, loaded and resumed."""
        check_name(name)
        if name in self.devices:
            raise OSError(errno.EBUSY, f"device {name} already exists")
        if uuid and any(d.uuid == uuid for d in self.devices.values()):
            raise OSError(errno.EBUSY, f"uuid {uuid} is already in use")
        # Parse first: a table with a syntax error creates nothing.
        segments = parse_table(table) if table is not None else None
        dev = MappedDevice(name, self._free_minor(minor), uuid, read_only)
        self.devices[name] = dev
        try:
            if segments is not None:
                await self._load(dev, segments)
                await self._resume(dev)
            if self.publisher is not None:
                self.publisher.register_device(dev.mapper_key, dev, f"dm {name}")
        except BaseException:
            del self.devices[name]
            for mapping in dev.take_tables():
                await mapping.destroy()
            raise
        return dev

    async def load(self, name: str, table: str) -> None:
        """dmsetup load/reload: build `table` into the inactive slot."""
        await self.load_segments(name, parse_table(table))

    async def load_segments(self, name: str, segments: list[Segment]) -> None:
        dev = self.get(name)
        async with self._lock(dev):
            await self._load(dev, segments)

    async def _load(self, dev: MappedDevice, segments: list[Segment]) -> None:
        mapping = build_mapping(segments, self.types, self._opener(dev), dev.raise_event,
                                dev.read_only)
        try:
            self._check_replacement(dev, mapping)
            await self._prepare(mapping)
        except BaseException:
            await mapping.destroy()
            raise
        old = dev.load(mapping)
        if old is not None:
            await old.destroy()

    @staticmethod
    async def _prepare(mapping: Mapping) -> None:
        """Let each target read its on-disk state (a constructor cannot await), refusing the
        table as a constructor would."""
        for seg, target in zip(mapping.segments, mapping.targets, strict=True):
            try:
                await target.prepare()
            except TargetError as e:
                raise seg.error(f"{seg.target}: {e}", e.errno) from None

    @staticmethod
    def _check_replacement(dev: MappedDevice, new: Mapping) -> None:
        if not dev.has_live:
            return
        immutable = dev.live.immutable_type()
        if immutable is not None and new.immutable_type() != immutable:
            raise TableError(f"can't replace immutable target type {immutable}")

    async def suspend(self, name: str, noflush: bool = False) -> None:
        dev = self.get(name)
        async with self._lock(dev):
            await dev.suspend(noflush)

    async def resume(self, name: str) -> None:
        dev = self.get(name)
        async with self._lock(dev):
            await self._resume(dev)

    @staticmethod
    async def _resume(dev: MappedDevice) -> None:
        """6.1's do_resume: an inactive table goes live first (dm_swap_table), then the
        targets resume; if one refuses, the device stays suspended on the new table (a
        refused `create` is removed, as libdevmapper reverts it). The replaced table is
        destroyed either way, as the kernel destroys it."""
        old = None
        if dev.inactive is not None:
            await dev.suspend()
            old = dev.swap_tables()
        try:
            await dev.resume()
        finally:
            if old is not None:
                await old.destroy()

    async def clear(self, name: str) -> None:
        dev = self.get(name)
        async with self._lock(dev):
            old = dev.clear()
            if old is not None:
                await old.destroy()

    async def remove(self, name: str, force: bool = False, deferred: bool = False) -> bool:
        """dmsetup remove: EBUSY while open (a table above holds it, or an NBD client has it);
        with `force`, an open device gets an error table first; with `deferred`, an open
        device is marked for removal on last close instead. True if it was removed now."""
        dev = self.get(name)
        async with self._lock(dev):
            removed = await self._remove(dev, force, deferred)
        if removed:
            self._locks.pop(id(dev), None)
        return removed

    async def _remove(self, dev: MappedDevice, force: bool, deferred: bool) -> bool:
        if not dev.open_count and await self._unpublish(dev):
            del self.devices[dev.name]
            for mapping in dev.take_tables():
                await mapping.destroy()
            if dev.deferred_remove:
                self._released.set()  # the reaper may have nothing left to wait for
            return True
        if force and dev.has_live:
            await self._load(dev, [Segment(0, dev.live.sectors, "error", ())])
            await self._resume(dev)
        if deferred:
            dev.deferred_remove = True
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
            return False
        users = self.info(dev.name).open_count
        raise OSError(errno.EBUSY, f"device {dev.name} is open"
                      + (f" ({users} holders)" if users else ""))

    async def _unpublish(self, dev: MappedDevice) -> bool:
        """Take the device out of the namespace; False while NBD clients have it open
        (they count as openers, as processes with the block device open do)."""
        if self.publisher is None:
            return True
        try:
            await self.publisher.remove(dev.mapper_key)
        except OSError as e:
            if e.errno == errno.ENOENT:  # forcibly removed from the namespace already
                return True
            if e.errno != errno.EBUSY:
                raise
            return False
        return True

    async def _reap(self) -> None:
        """Remove the devices marked for deferred removal as their last users let go; ends
        when none is marked. A table or the last NBD client letting go wakes it."""
        try:
            while True:
                self._released.clear()
                marked = [d for d in self.devices.values() if d.deferred_remove]
                if not marked:
                    return
                for dev in marked:
                    if dev.open_count:
                        continue
                    try:
                        async with self._lock(dev):
                            if dev.deferred_remove and not dev.removed \
                                    and await self._remove(dev, False, True):
                                self._locks.pop(id(dev), None)
                    except OSError as e:  # it stays marked; the next look tries again
                        log.warning("deferred removal of %s failed: %s", dev.name, e)
                await self._released.wait()
        finally:
            self._reaper = None

    async def remove_all(self, force: bool = False, deferred: bool = False) -> list[str]:
        """Remove every device that can be (marking the open ones with `deferred`); return
        the names left."""
        progress = True
        while progress:  # parents first frees their children for the next round
            progress = False
            for name in list(self.devices):
                try:
                    progress |= await self.remove(name, force, deferred)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
        return sorted(self.devices)

    async def rename(self, name: str, new_name: str) -> None:
        dev = self.get(name)
        check_name(new_name)
        async with self._lock(dev):
            if new_name in self.devices:
                raise OSError(errno.EBUSY, f"device {new_name} already exists")
            if self.publisher is not None:
                # The export name is the key: clients still connected keep it busy. Moved,
                # not removed and registered again: removal would close (revoke) the device.
                self.publisher.rekey(dev.mapper_key, MAPPER_PREFIX + new_name,
                                     f"dm {new_name}")
            del self.devices[name]
            dev.name = new_name
            self.devices[new_name] = dev
            dev.raise_event()  # as the kernel's rename counts one (its uevent)

    async def set_uuid(self, name: str, uuid: str) -> None:
        """dmsetup rename --setuuid: only a device without a UUID may be given one."""
        dev = self.get(name)
        if dev.uuid:
            raise OSError(errno.EINVAL, f"device {name} already has uuid {dev.uuid}")
        if any(d.uuid == uuid for d in self.devices.values()):
            raise OSError(errno.EBUSY, f"uuid {uuid} is already in use")
        dev.uuid = uuid
        dev.raise_event()  # as a rename (the kernel's uevent)

    # Queries

    def info(self, name: str) -> DeviceInfo:
        dev = self.get(name)
        info = dev.info()
        exported = self._exported_users(dev)
        return replace(info, open_count=info.open_count + exported) if exported else info

    def _exported_users(self, dev: MappedDevice) -> int:
        """NBD connections to the device, which the namespace counts."""
        return self.publisher.users(dev.mapper_key) if self.publisher is not None else 0

    def _key_unused(self, key: str) -> None:
        if key.startswith(MAPPER_PREFIX):
            dev = self.devices.get(key[len(MAPPER_PREFIX):])
            if dev is not None and dev.deferred_remove:
                self._released.set()

    def names(self) -> list[str]:
        return sorted(self.devices)

    def deps(self, name: str) -> list[Dependency]:
        dev = self.get(name)
        if not dev.has_live:
            return []
        # Last used first, as the kernel lists a table's devices (it adds each at the head)
        return [Dependency(r.name, r.device if isinstance(r.device, MappedDevice) else None,
                           r.number)
                for r in reversed(dev.live.devices())]

    def _slot(self, name: str, inactive: bool) -> Mapping | None:
        dev = self.get(name)
        if inactive:
            return dev.inactive
        return dev.live if dev.has_live else None

    def table(self, name: str, inactive: bool = False) -> list[TableLine]:
        mapping = self._slot(name, inactive)
        return mapping.table_lines() if mapping is not None else []

    def status(self, name: str, inactive: bool = False) -> list[tuple[int, int, str, str]]:
        mapping = self._slot(name, inactive)
        return mapping.status_lines() if mapping is not None else []

    def status_data(self, name: str, kind: StatusType, inactive: bool = False
                    ) -> list[SegmentStatus]:
        """`status` and `table` as data (MappedDevice.status_data)."""
        return self.get(name).status_data(kind, inactive)

    async def wait(self, name: str, event_nr: int | None = None) -> int:
        """dmsetup wait: return once the event counter exceeds `event_nr` (default: now)."""
        dev = self.get(name)
        return await dev.wait_event(dev.event_nr if event_nr is None else event_nr)

    async def message(self, name: str, sector: int, args: list[str]) -> str | None:
        dev = self.get(name)
        if not args:
            raise OSError(errno.EINVAL, "empty message")
        if args[0].startswith("@"):
            return await self._core_message(dev, args)
        if not dev.has_live:
            raise OSError(errno.EINVAL, f"device {name} has no live table")
        async with self._lock(dev):
            return await dev.live.target_at(sector).message(args)

    async def _core_message(self, dev: MappedDevice, args: list[str]) -> str | None:
        """A message to device-mapper itself, not a target (the kernel's message_for_md):
        `@cancel_deferred_remove` (the device stays when its last user lets go) and the
        statistics messages (dm/stats.py)."""
        if args[0].lower() in STATS_MESSAGES:
            async with self._lock(dev):
                if dev.removed:
                    raise no_device(dev.name)
                result = dev.stats.message(args, dev.live.sectors if dev.has_live else 0)
                dev.stats.attach(dev)
                return result
        if args[0].lower() != "@cancel_deferred_remove":
            raise OSError(errno.EINVAL, f"Unsupported message sent to DM core: {args[0]}")
        if len(args) != 1:
            raise OSError(errno.EINVAL, "Invalid arguments for @cancel_deferred_remove")
        async with self._lock(dev):
            if dev.removed:
                raise no_device(dev.name)
            dev.deferred_remove = False
        return None

    def target_versions(self) -> list[tuple[str, tuple[int, int, int]]]:
        return [(name, t.version) for name, t in self.types.items()]
