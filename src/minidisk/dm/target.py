"""What every target is: a `BlockDevice` over child devices, plus table/status/message text.

A target instance is one constructed segment of a table. Its I/O offsets are bytes relative
to the start of its segment; the mapped device (`mapping.py`) splits requests between
segments. Constructors get a `TargetContext`, through which they open child devices (held
until the table is destroyed, as the kernel's `dm_get_device`) and raise events, and they
report bad arguments by raising `TargetError` with the kernel's wording where there is one.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import ClassVar

from minidisk.device.api import BlockDevice, Caps, Extent
from minidisk.dm.route import Hop, Routable, forwards_only, unwrap
from minidisk.dm.status import NoStatus, Status, StatusType
from minidisk.dm.status_table import NoArgs
from minidisk.dm.table import SECTOR


class TargetError(ValueError):
    """A constructor rejected its arguments; the table builder names the segment. `errno`
    is what the kernel's load fails with: EINVAL, ENODEV when a device is not found."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


class DeviceRef:
    """A child device as a table names it.

    `key` is what the table prints, as the kernel prints a table's devices: MAJOR:MINOR, a
    mapped device's own (asked of it, so it follows renames) or the number the namespace
    gave the key; a key without a number (a file below a directory key) by its key.
    `name` is the namespace key (a mapped device's current /dev/mapper/NAME).
    """

    __slots__ = ("device", "given_key", "devno")

    def __init__(self, device: BlockDevice, key: str,
                 devno: tuple[int, int] | None = None) -> None:
        self.device = device
        self.given_key = key
        self.devno = devno

    @property
    def name(self) -> str:
        current = getattr(self.device, "mapper_key", None)
        return current if isinstance(current, str) else self.given_key

    @property
    def number(self) -> tuple[int, int] | None:
        own = getattr(self.device, "dm_devno", None)
        return own if isinstance(own, tuple) else self.devno

    @property
    def key(self) -> str:
        number = self.number
        return self.name if number is None else f"{number[0]}:{number[1]}"

    @property
    def sectors(self) -> int:
        return self.device.size // SECTOR


# Opening a key gives the device, the function that lets go of it again, and the key's
# device number if it has one.
Opener = Callable[[str], tuple[BlockDevice, Callable[[], None], tuple[int, int] | None]]


class TargetContext:
    """Constructor services for one segment: open devices, raise events."""

    def __init__(
        self, length: int, open_device: Opener, raise_event: Callable[[], None],
        read_only: bool = False,
    ) -> None:
        self.length = length
        self.read_only = read_only
        self.raise_event = raise_event
        self._open = open_device
        self._releases: list[Callable[[], None]] = []

    def device(self, key: str, start: int, length: int | None = None) -> DeviceRef:
        """Open `key` and check that sectors [start, start+length) lie inside it."""
        if length is None:
            length = self.length
        try:
            device, release, devno = self._open(key)
        except (KeyError, OSError) as e:
            raise TargetError(f"Device lookup failed: {key}: {_reason(e)}",
                              errno.ENODEV) from None
        self._releases.append(release)
        ref = DeviceRef(device, key, devno)
        if start + length > ref.sectors:
            raise TargetError(
                f"device {key} too small for target: needs sectors {start}..{start + length}, "
                f"has {ref.sectors}")
        return ref

    def close_all(self) -> None:
        while self._releases:
            self._releases.pop()()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e.args[0]) if e.args else type(e).__name__


def parse_uint(word: str, error: str, maximum: int = 2**64 - 1) -> int:
    """A decimal as the kernel's sscanf("%llu%c") reads it; `error` is the kernel's message."""
    if not word.isdigit() or int(word) > maximum:
        raise TargetError(f"{error}: {word!r}")
    return int(word)


def combine_caps(children: Iterable[Caps], read_only: bool = False) -> Caps:
    """Caps of a target that forwards every operation to all of `children`.

    Flush and zero are always offered: a flush skips children that have nothing to flush, and
    zero falls back to writing zeroes. The rest needs every child to really have it.
    """
    caps = list(children)
    return Caps(
        read_only=read_only or any(c.read_only for c in caps),
        flush=True,
        fua=all(c.fua for c in caps),
        trim=all(c.trim for c in caps),
        zero=True,
        fast_zero=all(c.fast_zero for c in caps),
        extents=all(c.extents for c in caps),
        cache=True,
        multi_conn=all(c.multi_conn for c in caps),
        rotational=any(c.rotational for c in caps),
    )


async def flush_device(device: BlockDevice) -> None:
    if device.caps.flush:
        await device.flush()


class Target(BlockDevice, Routable):
    """Base of all targets. Subclasses set `name`, `version` and implement the I/O; one
    that only moves reads and writes may let the mapped device route them (route.py)."""

    name: ClassVar[str]
    version: ClassVar[tuple[int, int, int]]
    # DM_TARGET_SINGLETON: must be the only segment; DM_TARGET_IMMUTABLE: a device that has
    # it may never load a table of another type.
    singleton: ClassVar[bool] = False
    immutable: ClassVar[bool] = False

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        self.length = ctx.length
        self.size = ctx.length * SECTOR

    def status_table(self) -> Status:
        """STATUSTYPE_TABLE as data (dm/status_table.py): the arguments that construct
        this target again."""
        return NoArgs()

    def status_info(self) -> Status:
        """STATUSTYPE_INFO as data (dm/status.py): what `dmsetup status` shows."""
        return NoStatus()

    def status_data(self, kind: StatusType) -> Status:
        return self.status_info() if kind is StatusType.INFO else self.status_table()

    # The texts, made from the data only (a target overrides the data, never these).

    def table_args(self) -> list[str]:
        """STATUSTYPE_TABLE text: `status_table`'s words."""
        return self.status_table().words()

    def status(self) -> str:
        """STATUSTYPE_INFO text (`dmsetup status`): `status_info`'s."""
        return self.status_info().text()

    def devices(self) -> list[DeviceRef]:
        """Children, for `deps`, `ls --tree` and flushes."""
        return []

    async def message(self, args: list[str]) -> str | None:
        raise OSError(errno.EINVAL, f"{self.name} target does not accept messages")

    async def flush(self) -> None:
        for ref in self.devices():
            await flush_device(ref.device)

    async def prepare(self) -> None:
        """After every segment is constructed, before the load is accepted: read what the
        target keeps on its devices (a COW store's exceptions). A `TargetError` refuses the
        table; the table is then destroyed, so `destroy` must cope with a failed prepare."""

    async def presuspend(self, noflush: bool) -> None:
        """Before a suspend waits for in-flight I/O: release anything the target holds back."""

    async def resume(self) -> None:
        """The table this target is in has become live (or the device resumed)."""

    async def destroy(self) -> None:
        """The table is being dropped; the builder closes the devices afterwards."""


class WindowTarget(Target):
    """A target over one child device from a sector offset; I/O is forwarded unless a
    subclass overrides it (linear overrides nothing; flakey and dust intervene)."""

    def open_window(self, ctx: TargetContext, key: str, start: str,
                    error: str = "Invalid device sector") -> None:
        self.start = parse_uint(start, error)
        self.ref = ctx.device(key, self.start)
        self.child = self.ref.device
        self.base = self.start * SECTOR
        self.caps = combine_caps([self.child.caps])
        self.block_size = self.child.block_size
        self.gate, self.inner = unwrap(self.child)
        # Routable unless a subclass intercepts reads or writes (flakey, dust, delay...).
        self.routable = self.caps.extents and forwards_only(type(self), WindowTarget)

    def route(self, offset: int, length: int) -> Hop | None:
        return self.gate, self.inner, offset + self.base, 0

    def devices(self) -> list[DeviceRef]:
        return [self.ref]

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.child.pread(buf, offset + self.base)

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        # pread_sparse_at, inlined: this runs once per read of every linear device.
        child, base = self.child, self.base
        if not self.caps.extents:  # a subclass that intercepts reads (flakey, dust)
            await self.pread(buf, offset)
            return []
        holes = await child.pread_sparse(buf, offset + base)
        if holes and base:
            holes = [(start - base, size) for start, size in holes]
        return holes

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
