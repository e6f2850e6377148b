"""Devices over a window of a host file: what `reg`, `blk` and `chr` keys map to.

The window rules are rump_etfs's: for a host file of `fsize` bytes, `begin > fsize` is EINVAL,
a size of RUMP_ETFS_SIZE_ENDOFF means "to the end", and `begin + size > fsize` is EINVAL. The
library never creates or grows files (drivespec.apply does that, as rump_server does).

The host file must be a regular file or a block device (EISDIR for a directory, EINVAL for
anything else). It is opened by descriptor (hostpath.py: no symbolic links unless the operator
asks, non-blocking until fstat has checked its type, so a FIFO cannot hang registration),
read-write, falling back to read-only like rumpblk; the device then says read_only.

`reg` is byte-granular. `chr` and `blk` take only whole 512-byte sectors (EINVAL otherwise, as
rumpblk) and advertise that minimum block size; their size is the window rounded down to whole
sectors. `blk` goes through a write-back `BlockCache`; `chr` does not.
"""

from __future__ import annotations

import errno
import os
import stat

from minidisk.device.api import MAX_REQUEST, BlockDevice, BlockSize, Extent
from minidisk.device.file import FileDevice
from minidisk.namespace.blockcache import BlockCache, CacheMemory
from minidisk.namespace.hostpath import open_host_file
from minidisk.namespace.keys import RUMP_ETFS_SIZE_ENDOFF, EtfsType

SECTOR = 512
SECTOR_BLOCK_SIZE = BlockSize(minimum=SECTOR, preferred=4096, maximum=MAX_REQUEST)


def host_file_kind(st: os.stat_result) -> None:
    """Refuse, with the errno rump_etfs would use, a host file that cannot back a device."""
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, "is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OSError(errno.EINVAL, "neither a regular file nor a block device")


def open_host(hostpath: str, follow_symlinks: bool = False) -> int:
    """A descriptor of the operator's `hostpath` (see hostpath.py), read-write if allowed."""
    fd, _ = open_host_file(hostpath, host_file_kind, follow_symlinks)
    return fd


def open_window(fd: int, hostpath: str, begin: int, size: int,
                block_size: BlockSize | None = None) -> FileDevice:
    """A FileDevice over [begin, begin+size) of the open host file `fd`, which it takes over.

    FileDevice applies rump_etfs's window checks (EINVAL past the end); ENDOFF becomes "to the
    end of the file".
    """
    length = None if size == RUMP_ETFS_SIZE_ENDOFF else size
    return FileDevice(hostpath, begin, length, block_size=block_size, fd=fd)


def open_host_device(fd: int, hostpath: str, etfs_type: EtfsType, begin: int, size: int,
                     memory: CacheMemory) -> BlockDevice:
    """The device a `reg`, `blk` or `chr` key maps to, over the open host file `fd` (which it
    takes over)."""
    if etfs_type.is_dir:
        os.close(fd)
        raise OSError(errno.EINVAL, "directory keys have no device of their own")
    if etfs_type is EtfsType.REG:
        return open_window(fd, hostpath, begin, size)
    window = open_window(fd, hostpath, begin, size, SECTOR_BLOCK_SIZE)
    window.size -= window.size % SECTOR
    inner: BlockDevice = BlockCache(window, memory) if etfs_type is EtfsType.BLK else window
    return SectorDevice(inner)


class SectorDevice(BlockDevice):
    """Refuse I/O that is not in whole sectors, as rumpblk does, and forward the rest."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.block_size = SECTOR_BLOCK_SIZE
        self.caps = inner.caps

    @staticmethod
    def _check(offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR:
            raise OSError(errno.EINVAL, f"I/O at {offset}+{length} is not in whole "
                                        f"{SECTOR}-byte sectors")

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        await self.inner.pread(buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._check(offset, len(buf))
        await self.inner.pwrite(buf, offset, fua)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length)
        await self.inner.trim(offset, length, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        self._check(offset, length)
        await self.inner.zero(offset, length, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.extents(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()
