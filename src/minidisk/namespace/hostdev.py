"""Devices over a window of a host file: what `reg`, `blk` and `chr` keys map to.

The window rules are rump_etfs's: for a host file of `fsize` bytes, `begin > fsize` is EINVAL,
a size of RUMP_ETFS_SIZE_ENDOFF means "to the end", and `begin + size > fsize` is EINVAL. The
library never creates or grows files (drivespec.apply does that, as rump_server does).

The host file must be a regular file or a block device (EISDIR for a directory, EINVAL for
anything else; a FIFO is refused before it is opened, so registration cannot hang on it). It
is opened read-write, falling back to read-only like rumpblk; the device then says read_only.

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
from minidisk.namespace.keys import RUMP_ETFS_SIZE_ENDOFF, EtfsType

SECTOR = 512
SECTOR_BLOCK_SIZE = BlockSize(minimum=SECTOR, preferred=4096, maximum=MAX_REQUEST)


def host_file_kind(hostpath: str) -> os.stat_result:
    """stat() a host path that may back a device, or raise the errno rump_etfs would."""
    st = os.stat(hostpath)
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, f"{hostpath} is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OSError(errno.EINVAL, f"{hostpath} is neither a regular file nor a block device")
    return st


def open_window(hostpath: str, begin: int, size: int,
                block_size: BlockSize | None = None) -> FileDevice:
    """A FileDevice over [begin, begin+size) of `hostpath`, read-write if the file allows it.

    FileDevice applies rump_etfs's window checks (EINVAL past the end); ENDOFF becomes "to the
    end of the file".
    """
    host_file_kind(hostpath)
    length = None if size == RUMP_ETFS_SIZE_ENDOFF else size
    try:
        return FileDevice(hostpath, begin, length, block_size=block_size)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return FileDevice(hostpath, begin, length, read_only=True, block_size=block_size)


def open_host_device(hostpath: str, etfs_type: EtfsType, begin: int, size: int,
                     memory: CacheMemory) -> BlockDevice:
    """The device a `reg`, `blk` or `chr` key maps to."""
    if etfs_type is EtfsType.REG:
        return open_window(hostpath, begin, size)
    if etfs_type.is_dir:
        raise OSError(errno.EINVAL, "directory keys have no device of their own")
    window = open_window(hostpath, begin, size, SECTOR_BLOCK_SIZE)
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
