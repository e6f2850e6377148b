"""Turn a plain user object into a `BlockDevice` (BUSE's promise, done right).

A user class needs `size` and `read`; everything else is optional and, when absent, is not
advertised to clients::

    class Disk:
        size = 64 << 20
        def read(self, offset, length): ...          # -> bytes-like of `length` bytes
        def write(self, offset, data): ...           # data is a memoryview; omit for read-only
        def flush(self): ...
        def trim(self, offset, length): ...
        def zero(self, offset, length): ...
        def extents(self, offset, length): ...       # -> iterable of (offset, length, flags)

Each method may be `async def`. Synchronous methods run in a bounded thread pool, because a
user method may block (on a file, a network call, a sleep); a class that promises it never
blocks sets ``blocking = False`` and its methods run inline on the event loop, which is much
faster for memory-like devices. Errors are raised as ``OSError(errno, ...)``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from minidisk.device.api import BlockDevice, BlockSize, Caps, Extent

_POOL_WORKERS = min(32, (os.cpu_count() or 1) * 4)
_pool: ThreadPoolExecutor | None = None


def io_pool() -> ThreadPoolExecutor:
    """The process-wide bounded pool for blocking device I/O (shared, created lazily)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_POOL_WORKERS, thread_name_prefix="minidisk-io")
    return _pool


async def run_blocking(func: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(io_pool(), func, *args)


def from_object(obj: Any, read_only: bool = False) -> BlockDevice:
    """Wrap `obj` (see module docstring) as a device; a `BlockDevice` is returned as is."""
    if isinstance(obj, BlockDevice):
        return obj
    return ObjectDevice(obj, read_only)


class ObjectDevice(BlockDevice):
    def __init__(self, obj: Any, read_only: bool = False) -> None:
        if not hasattr(obj, "read"):
            raise TypeError(f"{type(obj).__name__} has no read method")
        size = int(obj.size() if callable(obj.size) else obj.size)
        if size < 0:
            raise ValueError("size must not be negative")
        self.obj = obj
        self.size = size
        self.blocking = bool(getattr(obj, "blocking", True))
        bs = getattr(obj, "block_size", None)
        self.block_size = bs if isinstance(bs, BlockSize) else BlockSize()
        has = {name: callable(getattr(obj, name, None)) for name in
               ("write", "flush", "trim", "zero", "extents")}
        writable = has["write"] and not read_only
        self.caps = Caps(
            read_only=not writable,
            flush=has["flush"],
            fua=has["flush"] and writable,  # FUA is emulated as write + flush
            trim=has["trim"] and writable,
            zero=writable,  # native zero if present, else zero-buffer writes
            fast_zero=has["zero"] and writable,
            extents=has["extents"],
            # A user object is one shared state for all connections; flush is global.
            multi_conn=True,
        )
        self._has_readinto = callable(getattr(obj, "readinto", None))

    async def _call(self, name: str, *args: Any) -> Any:
        method = getattr(self.obj, name)
        if inspect.iscoroutinefunction(method):
            return await method(*args)
        if self.blocking:
            return await run_blocking(method, *args)
        return method(*args)

    async def pread(self, buf: memoryview, offset: int) -> None:
        if self._has_readinto:
            await self._call("readinto", buf, offset)
            return
        data = await self._call("read", offset, len(buf))
        if len(data) != len(buf):
            raise OSError(5, f"read returned {len(data)} bytes, expected {len(buf)}")
        buf[:] = data

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        await self._call("write", offset, buf)
        if fua:
            await self._call("flush")

    async def flush(self) -> None:
        await self._call("flush")

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._call("trim", offset, length)
        if fua:
            await self._call("flush")

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        if callable(getattr(self.obj, "zero", None)):
            await self._call("zero", offset, length)
            if fua:
                await self._call("flush")
        else:
            await super().zero(offset, length, may_trim, fast, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        raw: Iterable[Any] = await self._call("extents", offset, length)
        return [e if isinstance(e, Extent) else Extent(*e) for e in raw]

    async def close(self) -> None:
        close = getattr(self.obj, "close", None)
        if callable(close):
            result = close()
            if isinstance(result, Awaitable):
                await result

    def describe(self) -> str:
        return f"python object {type(self.obj).__name__}"
