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

All `blk` keys over one host file share one `BlockCache` of the whole file (`HostFiles`): with
a cache each, a key would read its own stale copy of a line another key had since written, and
its flush would write that copy back over the other's flushed data. A file is known by
(st_dev, st_ino), so hard links and `symlinks=follow` paths find the same cache, and a block
device by its device number, so two device nodes of one disk do. A key's window is a
`CacheWindow` into that cache; removing a key flushes the cache, and the last window closes it.
Lines are in file coordinates, so one at a window's edge holds bytes outside every window too;
write-back writes only the bytes inside writable windows, so bytes no `blk` key maps are
never written by the cache, as when each window had a cache of its own.
A key whose own open was read-only stays read-only; one that could write, joining a cache a
read-only open made, reads only. An uncached window (`reg`, `chr`, a file below a directory key)
that overlaps a cached one is refused with EBUSY, in either order: it would read stale bytes
around the cache, and the cache's write-back would undo its writes (rump_etfs(3) only says not
to touch a host file a BLK key maps). Beside a cached window it is fine.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from minidisk.device.api import MAX_REQUEST, BlockDevice, BlockSize, Caps, Extent
from minidisk.device.file import FileDevice, host_size, window_length
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


def open_host_device(fd: int, hostpath: str, etfs_type: EtfsType, begin: int, size: int,
                     files: HostFiles) -> BlockDevice:
    """The device a `reg`, `blk` or `chr` key maps to, over the open host file `fd` (which it
    takes over)."""
    if etfs_type.is_dir:
        os.close(fd)
        raise OSError(errno.EINVAL, "directory keys have no device of their own")
    if etfs_type is EtfsType.REG:
        return files.uncached(fd, hostpath, begin, size)
    if etfs_type is EtfsType.CHR:
        return SectorDevice(files.uncached(fd, hostpath, begin, size, sectors=True))
    return SectorDevice(files.cached(fd, hostpath, begin, size))


Span = tuple[int, int]  # [begin, end) of a host file


class HostFiles:
    """The host files of one namespace's keys: the shared cache of each file `blk` keys map,
    and where the uncached windows of each file lie (module docstring)."""

    def __init__(self, memory: CacheMemory) -> None:
        self.memory = memory
        self._caches: dict[tuple[int, int], SharedCache] = {}
        self._uncached: dict[tuple[int, int], list[Span]] = {}

    def cached(self, fd: int, hostpath: str, begin: int, size: int) -> CacheWindow:
        """A window over [begin, begin+size) of the host file `fd` (taken over, and closed
        when the file already has a cache) through that file's one cache."""
        try:
            identity, span = self._window(fd, hostpath, begin, size, SECTOR)
            _refuse_overlap(hostpath, span, self._uncached.get(identity, ()), "reg or chr")
            read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            shared = self._caches.get(identity)
            if shared is None:
                fd, owned = -1, fd  # FileDevice owns it now, and closes it if it fails
                whole = FileDevice(hostpath, block_size=SECTOR_BLOCK_SIZE, fd=owned)
                shared = self._caches[identity] = SharedCache(self, identity, whole)
            else:
                shared.cover(span[1])
        finally:
            if fd >= 0:
                os.close(fd)
        return CacheWindow(shared, span, read_only)

    def uncached(self, fd: int, hostpath: str, begin: int, size: int,
                 sectors: bool = False) -> FileDevice:
        """A FileDevice over [begin, begin+size) of the host file `fd` (which it takes over),
        in whole sectors if `sectors`, known here until it is closed."""
        try:
            identity, span = self._window(fd, hostpath, begin, size, SECTOR if sectors else 1)
            shared = self._caches.get(identity)
            _refuse_overlap(hostpath, span, shared.windows if shared else (), "blk")
        except BaseException:
            os.close(fd)
            raise
        spans = self._uncached.setdefault(identity, [])
        device = UncachedWindow(lambda: self._release(identity, span), hostpath, span[0],
                                span[1] - span[0], fd=fd,
                                block_size=SECTOR_BLOCK_SIZE if sectors else None)
        spans.append(span)
        return device

    @staticmethod
    def _window(fd: int, hostpath: str, begin: int, size: int,
                granule: int) -> tuple[tuple[int, int], Span]:
        """(identity, span): which file `fd` is (a block device by its number: two device nodes
        of one disk are one disk), and the window, checked and rounded down to `granule`."""
        st = os.fstat(fd)
        identity = (-1, st.st_rdev) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
        length = window_length(hostpath, host_size(fd), begin,
                               None if size == RUMP_ETFS_SIZE_ENDOFF else size)
        return identity, (begin, begin + length - length % granule)

    def _release(self, identity: tuple[int, int], span: Span) -> None:
        spans = self._uncached[identity]
        spans.remove(span)
        if not spans:
            del self._uncached[identity]

    def _forget(self, shared: SharedCache) -> None:
        if self._caches.get(shared.identity) is shared:
            del self._caches[shared.identity]


def _refuse_overlap(hostpath: str, span: Span, others: Iterable[Span], kind: str) -> None:
    for lo, hi in others:
        if lo < span[1] and span[0] < hi:
            raise OSError(errno.EBUSY, f"{hostpath} [{span[0]}, +{span[1] - span[0]}] "
                          f"overlaps a {kind} window [{lo}, +{hi - lo}] of the same file "
                          "(a blk key's cache and an uncached window would undo each "
                          "other's writes)")


class UncachedWindow(FileDevice):
    """A `reg` or `chr` window, which its file's HostFiles knows of until it is closed."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release: Callable[[], None] | None = release

    async def close(self) -> None:
        release, self._release = self._release, None
        try:
            await super().close()
        finally:
            if release is not None:
                release()


class SharedCache:
    """The cache of one host file, and the windows that use it."""

    def __init__(self, owner: HostFiles, identity: tuple[int, int], whole: FileDevice) -> None:
        self.identity = identity
        self.file = whole
        self.windows: list[Span] = []
        self.spans: list[Span] = []  # the writable windows': all it may write back
        self.cache = BlockCache(whole, owner.memory, self.spans)
        self._owner = owner

    def cover(self, end: int) -> None:
        """Make the cache reach `end` (the file grew for a new window since it was made)."""
        if end > self.cache.size:
            self.file.size = end
            self.cache.grow(end, self.file.pread_blocking)

    def attach(self, span: Span, writable: bool) -> None:
        self.windows.append(span)
        if writable:
            self.spans.append(span)

    async def release(self, span: Span, writable: bool) -> None:
        """The window over `span` is gone: write back what it (or anyone) wrote, as a removed
        key always has, then stop writing back its bytes; close the cache with the last one."""
        try:
            if writable:
                await self.cache.flush()
        finally:
            self.windows.remove(span)
            if writable:
                self.spans.remove(span)
            # Checked after the flush: a key registered meanwhile keeps the cache open. With
            # no window left nothing can dirty it, so closing writes nothing back.
            if not self.windows:
                self._owner._forget(self)
                await self.cache.close()


class CacheWindow(BlockDevice):
    """One `blk` key: [base, base+size) of its host file, through the file's shared cache."""

    def __init__(self, shared: SharedCache, span: Span, read_only: bool) -> None:
        self.shared = shared
        self.backing = shared.cache
        self.base = span[0]
        self.size = span[1] - span[0]
        self.block_size = self.backing.block_size
        caps = self.backing.caps
        if read_only and not caps.read_only:  # this key's open said read-only: keep it so
            caps = replace(caps, read_only=True, fua=False, trim=False, zero=False,
                           fast_zero=False)
        self.caps: Caps = caps
        self._span: Span | None = span
        shared.attach(span, not caps.read_only)

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.backing.pread(buf, self.base + offset)

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await self.backing.pwrite(buf, self.base + offset, fua)

    async def flush(self) -> None:
        await self.backing.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.backing.trim(self.base + offset, length, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self.backing.zero(self.base + offset, length, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(e.offset - self.base, e.length, e.flags)
                for e in await self.backing.extents(self.base + offset, length)]

    async def cache(self, offset: int, length: int) -> None:
        await self.backing.cache(self.base + offset, length)

    async def close(self) -> None:
        span, self._span = self._span, None
        if span is not None:
            await self.shared.release(span, not self.caps.read_only)

    def describe(self) -> str:
        return f"[{self.base}, +{self.size}] of {self.backing.describe()}"


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
