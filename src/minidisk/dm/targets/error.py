"""`error`: every read, write, trim and zero fails with EIO (dmsetup(8)).

A flush succeeds: the kernel sends no flush bios to this target (num_flush_bios is 0), so a
table of `linear` plus `error` segments still flushes its linear part (dmtest relies on it).

Swapped in by `dmsetup remove -f` so that a device still open stops touching its children.
"""

from __future__ import annotations

import errno

from minidisk.device.api import Caps, Extent
from minidisk.dm.target import Target, TargetContext, TargetError


def _fail() -> OSError:
    return OSError(errno.EIO, "I/O to an error target")


class Error(Target):
    name = "error"
    version = (1, 5, 0)  # 6.1's
    caps = Caps(flush=True, fua=True, trim=True, zero=True, multi_conn=True)

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if args:
            raise TargetError("No arguments required")

    async def pread(self, buf: memoryview, offset: int) -> None:
        raise _fail()

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        raise _fail()

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise _fail()

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        raise _fail()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        raise _fail()

    async def cache(self, offset: int, length: int) -> None:
        raise _fail()
