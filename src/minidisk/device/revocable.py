"""A device that can be revoked: how a forced `remove` takes a device away from its users.

After `revoke()` every new request fails at once with ESHUTDOWN. A request already inside the
inner device is allowed to finish there, and then fails with ESHUTDOWN whatever its outcome:
abandoning it instead would leave a pool thread reading into (or writing from) a buffer the
server has already reused for another request, and closing the host file under it could let
the write land in whatever file reuses the descriptor number. So the inner device is closed
only after the last in-flight request has come back (`drained`), which a forced `remove`
awaits. Other devices are not involved in any of this.

`Revocable` is what the namespace needs of every device it holds. A device that already
counts its requests (a dm mapped device does, for suspend) implements it itself and saves the
wrapper's coroutine on every request; any other device is wrapped in a `RevocableDevice`.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import TypeVar

from minidisk.device.api import BlockDevice, BlockSize, Caps, Extent

T = TypeVar("T")


def shutdown_error() -> OSError:
    return OSError(errno.ESHUTDOWN, "device was removed from the namespace")


class Revocable(BlockDevice):
    """A device that can be taken away from its users (see the module docstring).

    `revoke()`: every later request fails with ESHUTDOWN at once, every request in flight
    when it returns. `close()`: revoke, wait until no request is inside, then release what
    the device holds (once)."""

    revoked: bool

    def revoke(self) -> None:
        raise NotImplementedError


def revocable(device: BlockDevice) -> Revocable:
    """`device` itself when it implements revocation, else wrapped."""
    return device if isinstance(device, Revocable) else RevocableDevice(device)


class RevocableDevice(Revocable):
    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.revoked = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None  # created on first use, in the serving loop
        self._closed = False

    # Read through, not copied: a dm mapped device changes size when a new table is resumed.

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.inner.size

    @property
    def block_size(self) -> BlockSize:  # type: ignore[override]
        return self.inner.block_size

    @property
    def caps(self) -> Caps:  # type: ignore[override]
        return self.inner.caps

    async def _forward(self, call: Callable[[], Awaitable[T]]) -> T:
        self.enter()
        try:
            result = await call()
        finally:
            self.leave()
        return result

    # The data path forwards without `_forward`'s closure: it runs once per request per
    # layer (a striped read over namespace keys passes here once per chunk).

    async def pread(self, buf: memoryview, offset: int) -> None:
        self.enter()
        try:
            await self.inner.pread(buf, offset)
        finally:
            self.leave()

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        self.enter()
        try:
            holes = await self.inner.pread_sparse(buf, offset)
        finally:
            self.leave()
        return holes

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self.enter()
        try:
            await self.inner.pwrite(buf, offset, fua)
        finally:
            self.leave()

    # `enter` and `leave` bracket every call into the inner device. They are public for the
    # dm fast path (minidisk/dm/route.py: its gate contract), which steps over this wrapper
    # on the hot path and must bracket its calls exactly as the methods here do.

    def enter(self) -> None:
        if self.revoked:
            raise shutdown_error()
        self.in_flight += 1

    def leave(self) -> None:
        """After the inner call; raises if the device was revoked meanwhile."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
        if self.revoked:
            raise shutdown_error()

    async def flush(self) -> None:
        await self._forward(self.inner.flush)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._forward(lambda: self.inner.trim(offset, length, fua))

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self._forward(lambda: self.inner.zero(offset, length, may_trim, fast, fua))

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self._forward(lambda: self.inner.extents(offset, length))

    async def cache(self, offset: int, length: int) -> None:
        await self._forward(lambda: self.inner.cache(offset, length))

    def revoke(self) -> None:
        """Fail every later request, and every in-flight one when it returns."""
        self.revoked = True

    async def drained(self) -> None:
        """Return once no request is inside the inner device."""
        while self.in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    async def close(self) -> None:
        """Revoke, wait for in-flight requests, then close the inner device (once)."""
        self.revoke()
        await self.drained()
        if not self._closed:
            self._closed = True
            await self.inner.close()

    def describe(self) -> str:
        return ("revoked " if self.revoked else "") + self.inner.describe()

