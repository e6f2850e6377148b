"""The snapshot target's exception stores, in the kernel's formats (MD/dm-snap-persistent.c,
dm-snap-transient.c, dm-exception-store.c).

An exception says that chunk `old` of the origin has been copied to chunk `new` of the COW
device. The store allocates new chunks, commits exceptions, reports usage and, for merging,
hands the committed exceptions back newest first.

Persistent store (`P`, `PO`): little-endian, addressed in chunks of `chunk_size` sectors::

    chunk 0          header  {u32 magic "SnAp" 0x70416e53, u32 valid, u32 version 1,
                              u32 chunk_size (sectors)}, the rest of the chunk zero
    chunk 1+i*(E+1)  metadata area i: E = chunk_size*512/16 exceptions {le64 old_chunk,
                     le64 new_chunk}; the list ends at the first new_chunk 0
    the E chunks after area i: the data chunks those exceptions point at

A header whose magic is 0 is a new store: the header is written and area 0 zeroed. Commit
order is the kernel's: the data chunk is copied first, then the exception is put in the
in-memory area and the whole area written with a flush before it and FUA (the data is
stable before the metadata that points at it); when an area fills, the next area is zeroed
on disk before the full one is written. Any metadata write error makes the store invalid;
invalidating writes the header again with valid 0, and a store loaded with valid 0 is an
invalid snapshot. The kernel batches the area write while other exceptions are in flight;
this store writes it at every commit (the same bytes, more often).

Transient store (`N`): exceptions in memory only; chunks are handed out from chunk 0.
"""

from __future__ import annotations

import errno
import logging
import struct

from minidisk.device.api import BlockDevice
from minidisk.dm.table import SECTOR

log = logging.getLogger(__name__)

SNAP_MAGIC = 0x70416E53  # "SnAp"
DISK_VERSION = 1
DEFAULT_CHUNK_SECTORS = 32  # DM_CHUNK_SIZE_DEFAULT_SECTORS, 16 KiB
HEADER = struct.Struct("<IIII")  # magic, valid, version, chunk_size
EXCEPTION = struct.Struct("<QQ")  # old_chunk, new_chunk
MAX_CHUNK_SECTORS = (2**31 - 1) >> 9  # INT_MAX >> SECTOR_SHIFT


class StoreError(ValueError):
    """The store's arguments or metadata are refused; the text is the kernel's reason, and
    `errno` what the load fails with."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


def check_chunk_size(chunk: int, *devices: BlockDevice) -> None:
    """dm_exception_store_set_chunk_size's rules."""
    if chunk <= 0 or chunk & (chunk - 1):
        raise StoreError("Chunk size is not a power of 2")
    for dev in devices:
        if chunk % max(1, dev.block_size.minimum // SECTOR):
            raise StoreError("Chunk size is not a multiple of device blocksize")
    if chunk > MAX_CHUNK_SECTORS:
        raise StoreError("Chunk size is too high")


async def write_stable(dev: BlockDevice, data: memoryview, offset: int) -> None:
    """REQ_PREFLUSH | REQ_FUA: what was written before is stable first, then this is."""
    if dev.caps.flush:
        await dev.flush()
    await dev.pwrite(data, offset, dev.caps.fua)
    if not dev.caps.fua and dev.caps.flush:
        await dev.flush()


class ExceptionStore:
    """What the snapshot target asks of a store (dm_exception_store_type)."""

    kind = ""  # the table's letter
    supports_merge = False

    def __init__(self, cow: BlockDevice, chunk_size: int, overflow: bool) -> None:
        self.cow = cow
        self.chunk_size = chunk_size  # sectors; 0 until known
        self.overflow = overflow  # PO: userspace understands "Overflow"

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_size * SECTOR

    @property
    def cow_sectors(self) -> int:
        return self.cow.size // SECTOR

    def table_args(self) -> list[str]:
        return [self.kind + ("O" if self.overflow else ""), str(self.chunk_size)]

    async def read_metadata(self) -> tuple[bool, list[tuple[int, int]]]:
        """(valid, exceptions as (old, new)); OSError or StoreError if unreadable."""
        raise NotImplementedError

    def prepare(self) -> int | None:
        """Allocate a new chunk for an exception; None when the COW device is full."""
        raise NotImplementedError

    async def commit(self, old: int, new: int, valid: bool) -> bool:
        """Record a prepared exception whose data is on the COW device (unless `valid` is
        False: the copy failed). Calls come in the order `prepare` handed the chunks out.
        Returns whether the store is still valid."""
        raise NotImplementedError

    async def drop(self) -> None:
        """Invalidate the store (persistently, if it is persistent)."""

    def usage(self) -> tuple[int, int, int]:
        """(total sectors, sectors allocated, metadata sectors), for the status line."""
        raise NotImplementedError

    async def prepare_merge(self) -> tuple[int, int, int]:
        """(count, last old chunk, last new chunk) of the newest run of consecutive
        exceptions; count 0 when none are left."""
        raise OSError(errno.EOPNOTSUPP, "store cannot merge")

    async def commit_merge(self, count: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "store cannot merge")


class TransientStore(ExceptionStore):
    kind = "N"

    def __init__(self, cow: BlockDevice, chunk_size: int, overflow: bool) -> None:
        # dm-snap-transient ignores the option letters after N (and so prints none).
        super().__init__(cow, chunk_size, False)
        self.next_free = 0  # sectors

    async def read_metadata(self) -> tuple[bool, list[tuple[int, int]]]:
        return True, []

    def prepare(self) -> int | None:
        if self.cow_sectors < self.next_free + self.chunk_size:
            return None
        new = self.next_free // self.chunk_size
        self.next_free += self.chunk_size
        return new

    async def commit(self, old: int, new: int, valid: bool) -> bool:
        return valid

    def usage(self) -> tuple[int, int, int]:
        return self.cow_sectors, self.next_free, 0


class PersistentStore(ExceptionStore):
    kind = "P"
    supports_merge = True

    def __init__(self, cow: BlockDevice, chunk_size: int, overflow: bool) -> None:
        super().__init__(cow, chunk_size, overflow)
        self.valid = True
        self.version = DISK_VERSION
        self.next_free = 2  # the header and the first area
        self.current_area = 0
        self.current_committed = 0  # exceptions in the current area
        self.area = bytearray()

    @property
    def per_area(self) -> int:
        return self.chunk_bytes // EXCEPTION.size

    def area_location(self, area: int) -> int:
        return 1 + (self.per_area + 1) * area

    def _skip_metadata(self) -> None:
        if self.next_free % (self.per_area + 1) == 1:
            self.next_free += 1

    async def _chunk_io(self, chunk: int, buf: bytearray | bytes, write: bool,
                        stable: bool = False) -> None:
        offset = chunk * self.chunk_bytes
        if offset + self.chunk_bytes > self.cow.size:  # the block layer's "beyond end"
            raise OSError(errno.EIO, f"COW chunk {chunk} lies beyond the device's end")
        view = memoryview(buf)
        if not write:
            await self.cow.pread(view, offset)
        elif stable:
            await write_stable(self.cow, view, offset)
        else:
            await self.cow.pwrite(view, offset)

    async def _write_header(self) -> None:
        header = bytearray(self.chunk_bytes)
        HEADER.pack_into(header, 0, SNAP_MAGIC, int(self.valid), self.version,
                         self.chunk_size)
        await self._chunk_io(0, header, write=True)

    async def read_metadata(self) -> tuple[bool, list[tuple[int, int]]]:
        if not self.chunk_size:
            self.chunk_size = max(DEFAULT_CHUNK_SECTORS,
                                  self.cow.block_size.minimum // SECTOR)
        header = bytearray(self.chunk_bytes)
        await self._chunk_io(0, header, write=False)
        magic, valid, version, chunk_size = HEADER.unpack_from(header)
        new_store = magic == 0
        if not new_store:
            if magic != SNAP_MAGIC:
                raise StoreError("Invalid or corrupt snapshot", errno.ENXIO)
            self.valid, self.version = bool(valid), version
            if chunk_size != self.chunk_size:
                log.warning("chunk size %d in device metadata overrides table chunk size "
                            "of %d.", chunk_size, self.chunk_size)
                check_chunk_size(chunk_size, self.cow)
                self.chunk_size = chunk_size
        self.area = bytearray(self.chunk_bytes)
        if new_store:
            await self._write_header()
            self.current_area = 0
            await self._chunk_io(self.area_location(0), bytes(self.chunk_bytes), write=True)
            return True, []
        if self.version != DISK_VERSION:
            raise StoreError(f"unable to handle snapshot disk version {self.version}")
        if not self.valid:
            return False, []
        return True, await self._read_exceptions()

    async def _read_exceptions(self) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        self.current_area = 0
        while True:
            area = bytearray(self.chunk_bytes)
            await self._chunk_io(self.area_location(self.current_area), area, write=False)
            full = True
            for i in range(self.per_area):
                old, new = EXCEPTION.unpack_from(area, i * EXCEPTION.size)
                if new == 0:  # chunk 0 is the header: the end of the list
                    self.current_committed = i
                    full = False
                    break
                self.next_free = max(self.next_free, new + 1)
                found.append((old, new))
            if not full:
                self.area = area
                break
            self.current_area += 1
        self._skip_metadata()
        return found

    def prepare(self) -> int | None:
        if self.cow_sectors < (self.next_free + 1) * self.chunk_size:
            return None
        new = self.next_free
        self.next_free += 1
        self._skip_metadata()
        return new

    async def commit(self, old: int, new: int, valid: bool) -> bool:
        if not valid:
            self.valid = False
        EXCEPTION.pack_into(self.area, self.current_committed * EXCEPTION.size, old, new)
        self.current_committed += 1
        full = self.current_committed == self.per_area
        if full:
            try:
                await self._chunk_io(self.area_location(self.current_area + 1),
                                     bytes(self.chunk_bytes), write=True)
            except OSError as e:
                log.error("snapshot: zeroing the next metadata area failed: %s", e)
                self.valid = False
        if self.valid:
            try:
                await self._chunk_io(self.area_location(self.current_area), self.area,
                                     write=True, stable=True)
            except OSError as e:
                log.error("snapshot: writing a metadata area failed: %s", e)
                self.valid = False
        if full:
            self.current_committed = 0
            self.current_area += 1
            self.area = bytearray(self.chunk_bytes)
        return self.valid

    async def drop(self) -> None:
        self.valid = False
        try:
            await self._write_header()
        except OSError as e:
            log.warning("write header failed: %s", e)

    def usage(self) -> tuple[int, int, int]:
        return (self.cow_sectors, self.next_free * self.chunk_size,
                (self.current_area + 2) * self.chunk_size)

    def _exception(self, index: int) -> tuple[int, int]:
        old, new = EXCEPTION.unpack_from(self.area, index * EXCEPTION.size)
        return old, new

    async def prepare_merge(self) -> tuple[int, int, int]:
        if not self.current_committed:
            if not self.current_area:
                return 0, 0, 0
            self.current_area -= 1
            await self._chunk_io(self.area_location(self.current_area), self.area,
                                 write=False)
            self.current_committed = self.per_area
        last_old, last_new = self._exception(self.current_committed - 1)
        count = 1
        while count < self.current_committed:
            old, new = self._exception(self.current_committed - 1 - count)
            if old != last_old - count or new != last_new - count:
                break
            count += 1
        return count, last_old, last_new

    async def commit_merge(self, count: int) -> None:
        for i in range(count):
            at = (self.current_committed - 1 - i) * EXCEPTION.size
            self.area[at:at + EXCEPTION.size] = bytes(EXCEPTION.size)
        await self._chunk_io(self.area_location(self.current_area), self.area, write=True,
                             stable=True)
        self.current_committed -= count
        # What next_free would be had every exception been committed in order: only the
        # status line uses it from now on (as in the kernel).
        self.next_free = self.area_location(self.current_area) + self.current_committed + 1


def create_store(kind: str, chunk: str, cow: BlockDevice,
                 origin: BlockDevice) -> ExceptionStore:
    """dm_exception_store_create: `P`, `PO` (any case) or `N`, and a chunk size in sectors
    (0: persistent stores take the default or the one on disk)."""
    letter = kind[:1].upper()
    if letter not in ("P", "N"):
        raise StoreError("Exception store type is not P or N")
    if not chunk.isdigit() or int(chunk) > 2**32 - 1:  # kstrtouint
        raise StoreError("Invalid chunk size")
    size = int(chunk)
    if size:
        check_chunk_size(size, cow, origin)
    options = kind[1:]
    if letter == "N":
        return TransientStore(cow, size, False)
    if options and options[0].upper() != "O":
        raise StoreError(f"Unsupported persistent store option: {options}")
    return PersistentStore(cow, size, bool(options))
