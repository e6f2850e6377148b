"""Large payload buffers reused without a memset: one pool per connection.

`bytearray(n)` zero-fills, and for a 1 MiB READ reply or WRITE payload that memset was a
tenth of the server's CPU (perf, 1 MiB reads at depth 8: memset 9.8 %, the device copy
17 %, the kernel's copy into the socket 25 %); Python has no uninitialised buffer. So a
connection keeps the large buffers its requests used and hands them out again, sized
exactly (clients repeat one request size).

A buffer goes back to the pool as soon as its request is done with it, although the
transport may still be sending from it (uvloop holds a view until the bytes are written)
or a device may have kept a view. It is handed out again only once nothing refers to its
memory: a bytearray cannot be resized while any view of it exists (CPython counts them,
views of views included), so a resize by one byte and back, both within its allocation,
tells cheaply whether it is free. A buffer still in use is simply not taken.

A reused buffer holds what the connection read or was sent before, so the pool is the
connection's own: a device that did not fill a READ buffer could at worst send the same
client its own earlier data, never another connection's. What the pools hold is bounded
per connection (POOL_BYTES) and for all connections of an event loop together
(LOOP_POOL_BYTES, counted in a per-loop `PoolLimit`), however many connect; a connection's
pool is dropped when it closes. No timer empties a pool: a server idle after a burst keeps
at most LOOP_POOL_BYTES here, as the heap keeps up to malloc_tuning's TRIM_THRESHOLD.
"""

from __future__ import annotations

import asyncio
import weakref

MIN_POOLED = 128 * 1024  # below this a fresh zero-filled buffer costs less than a lookup
MAX_POOLED = 4 * 1024 * 1024
POOL_BYTES = 16 * 1024 * 1024  # one connection's pool: depth 8 of 1 MiB, and their replies
LOOP_POOL_BYTES = 64 * 1024 * 1024
PER_SIZE = 16  # buffers of one size looked through before a new one is made


def unreferenced(buf: bytearray) -> bool:
    """Whether no view of `buf` exists (so nothing else can read or write its memory)."""
    try:
        del buf[-1:]  # a shrink within the allocation: refused while a view exists
    except BufferError:
        return False
    buf.append(0)  # back to its size, still within the allocation
    return True


class PoolLimit:
    """Bytes held by all pools of one event loop."""

    def __init__(self, limit: int = LOOP_POOL_BYTES) -> None:
        self.limit = limit
        self.held = 0


_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PoolLimit] = \
    weakref.WeakKeyDictionary()


def loop_limit(loop: asyncio.AbstractEventLoop) -> PoolLimit:
    """The limit shared by the pools of the connections `loop` serves (it holds no
    reference to the loop, so it goes when the loop goes)."""
    limit = _limits.get(loop)
    if limit is None:
        limit = _limits[loop] = PoolLimit()
    return limit


class BufferPool:
    def __init__(self, shared: PoolLimit, limit: int = POOL_BYTES) -> None:
        self.shared = shared
        self.limit = limit
        self.free: dict[int, list[bytearray]] = {}
        self.held = 0  # bytes of the buffers in `free`

    def take(self, size: int) -> bytearray:
        """A buffer of `size` bytes whose content is unspecified (zeroes or this
        connection's earlier payloads)."""
        if MIN_POOLED <= size <= MAX_POOLED:
            kept = self.free.get(size)
            if kept:
                for i, buf in enumerate(kept):
                    if unreferenced(buf):
                        del kept[i]
                        self._count(-size)
                        return buf
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """`buf` is no longer ours to use; keep it for a later take once it is free."""
        size = len(buf)
        if size < MIN_POOLED or size > MAX_POOLED:
            return
        kept = self.free.setdefault(size, [])
        if self.held + size > self.limit and len(self.free) > 1:
            for other in [s for s in self.free if s != size]:  # the client changed sizes
                self._count(-other * len(self.free.pop(other)))
        if (len(kept) >= PER_SIZE or self.held + size > self.limit
                or self.shared.held + size > self.shared.limit):
            return
        kept.append(buf)
        self._count(size)

    def clear(self) -> None:
        self._count(-self.held)
        self.free.clear()

    def _count(self, delta: int) -> None:
        self.held += delta
        self.shared.held += delta
