"""`zero`: reads return zeroes, writes are accepted and dropped (DOC/zero.rst)."""

from __future__ import annotations

from minidisk.device.api import EXTENT_HOLE, EXTENT_ZERO, Caps, Extent
from minidisk.dm.target import Target, TargetContext, TargetError

_ZEROES = bytes(1 << 20)


class Zero(Target):
    name = "zero"
    version = (1, 2, 0)
    caps = Caps(flush=True, fua=True, trim=True, zero=True, fast_zero=True, extents=True,
                cache=True, multi_conn=True)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if args:
            raise TargetError("No arguments required")

    async def pread(self, buf: memoryview, offset: int) -> None:
        pos, end = 0, len(buf)
        while pos < end:
            n = min(len(_ZEROES), end - pos)
            buf[pos:pos + n] = _ZEROES[:n]
            pos += n

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
