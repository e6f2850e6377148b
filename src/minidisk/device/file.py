"""Host-file device: a whole file, block device, or a window (offset, length) of one.

I/O runs in the shared bounded thread pool: `preadv` on a page-cache miss blocks, and the
event loop must keep serving other requests meanwhile. Holes are found with SEEK_DATA and
SEEK_HOLE; trim and zero punch or zero ranges with fallocate(2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat

from minidisk.device.adapter import run_blocking
from minidisk.device.api import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    BlockDevice,
    BlockSize,
    Caps,
    Extent,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def host_size(fd: int) -> int:
    """Size of a regular file or a block device (st_size is 0 for the latter)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)


def window_length(path: str, total: int, offset: int, length: int | None) -> int:
    """The length of the window [offset, +length) of a host file of `total` bytes (None: to
    its end), or EINVAL when it does not lie inside the file (rump_etfs's rule)."""
    if offset < 0 or offset > total:
        raise OSError(errno.EINVAL, f"offset {offset} is past the end of {path} ({total})")
    if length is None:
        length = total - offset
    if length < 0 or offset + length > total:
        raise OSError(errno.EINVAL,
                      f"window {offset}+{length} is past the end of {path} ({total})")
    return length


class FileDevice(BlockDevice):
    def __init__(
        self, path: str, offset: int = 0, length: int | None = None, read_only: bool = False,
        block_size: BlockSize | None = None, fd: int | None = None,
    ) -> None:
        """`fd`, when given, is an open descriptor of `path` that the device takes over (and
        closes), so that the file is never opened again by a name that may have changed;
        `path` then only describes it. A read-only `fd` makes a read-only device."""
        self.path = path
        if fd is None:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        elif fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            read_only = True
        self.fd = fd
        try:
            length = window_length(path, host_size(self.fd), offset, length)
            self.is_regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        except BaseException:
            os.close(self.fd)
            raise
        self.base = offset
        self.size = length
        self.block_size = block_size or BlockSize()
        writable = not read_only
        self.caps = Caps(
            read_only=read_only, flush=True, fua=writable, trim=writable and self.is_regular,
            zero=writable, fast_zero=writable and self.is_regular, extents=self.is_regular,
            cache=True, multi_conn=True,
        )

    # The blocking halves run in the pool; each loops over short transfers.

    def pread_blocking(self, buf: memoryview, offset: int) -> None:
        """`pread` in the calling thread: for a few bytes where awaiting is not possible."""
        pos = 0
        while pos < len(buf):
            n = os.preadv(self.fd, [buf[pos:]], self.base + offset + pos)
            if n == 0:  # the host file shrank under us: the missing tail reads as zeroes
                buf[pos:] = bytes(len(buf) - pos)
                return
            pos += n

    def _pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        flags = os.RWF_DSYNC if fua else 0
        pos = 0
        while pos < len(buf):
            pos += os.pwritev(self.fd, [buf[pos:]], self.base + offset + pos, flags)

    async def pread(self, buf: memoryview, offset: int) -> None:
        await run_blocking(self.pread_blocking, buf, offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await run_blocking(self._pwrite, buf, offset, fua)

    async def flush(self) -> None:
        await run_blocking(os.fdatasync, self.fd)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await run_blocking(self._punch, offset, length, fua)

    def _punch(self, offset: int, length: int, fua: bool) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.base + offset, length)
        if fua:
            os.fdatasync(self.fd)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        if self.is_regular:
            modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []
            modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
            for mode in modes:
                try:
                    await run_blocking(fallocate, self.fd, mode, self.base + offset, length)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    continue
                if fua:
                    await self.flush()
                return
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing this file would not be fast")
        await self.write_zeroes_slowly(offset, length, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        extents: list[Extent] = await run_blocking(self._extents, offset, length)
        return extents

    def _extents(self, offset: int, length: int) -> list[Extent]:
        start, end = self.base + offset, self.base + offset + length
        out: list[Extent] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data = end
            data = min(data, end)
            if data > pos:
                out.append(Extent(pos - self.base, data - pos, EXTENT_HOLE | EXTENT_ZERO))
                pos = data
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append(Extent(pos - self.base, hole - pos, 0))
            pos = hole
        return out

    async def cache(self, offset: int, length: int) -> None:
        await run_blocking(os.posix_fadvise, self.fd, self.base + offset, length,
                           os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"file {self.path} [{self.base}, +{self.size}]"
