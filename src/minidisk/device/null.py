"""Devices with no storage: `null` (writes vanish, reads are zero) and `zero` (read-only)."""

from __future__ import annotations

from minidisk.device.api import EXTENT_HOLE, EXTENT_ZERO, BlockDevice, Caps, Extent


class NullDevice(BlockDevice):
    """Like nbdkit's null plugin: a sink for benchmarks and copy tests."""

    caps = Caps(flush=True, fua=True, trim=True, zero=True, fast_zero=True, extents=True,
                cache=True, multi_conn=True)

    def __init__(self, size: int) -> None:
        self.size = size

    async def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = bytes(len(buf))

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        pass

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        pass

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, EXTENT_HOLE | EXTENT_ZERO)]

    async def cache(self, offset: int, length: int) -> None:
        pass

    def describe(self) -> str:
        return f"null {self.size} bytes"


class ZeroDevice(NullDevice):
    """A read-only device of zeroes."""

    caps = Caps(read_only=True, extents=True, cache=True, multi_conn=True)

    def describe(self) -> str:
        return f"zero {self.size} bytes"
