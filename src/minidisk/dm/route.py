"""The dm fast path: a mapped device calls its child's device itself.

Why it exists: at ~170k requests/s a 4 KiB request costs ~6 µs of server CPU and every
coroutine layer ~0.2-0.4 µs of it. A mapped device with a linear table over a namespace key is
three layers (the mapped device, the target, the key's `RevocableDevice`) above the device
that does the work. When the table has one segment and its target does nothing to a read or a
write but move it, the mapped device asks the target where the request goes and awaits that
device itself: as deep as the raw device plus one (bench/README.md has the figures).

The contract has three parties, all described here:

- The target (`Routable`, a base of every `Target`) says `routable` only if its pread,
  pread_sparse and pwrite do nothing but move the request (`forwards_only`) and every child
  tells holes (caps.extents; a routed pread_sparse asks the child, which must answer as the
  target would). `route(offset, length)` is then asked for every such request and answers a
  `Hop`, or None for a request it must handle itself (striped: one that spans chunks);
  `route_failed(tag, error)` hears of a routed call that failed (striped counts it).
- The gate: a child behind a `RevocableDevice` is stepped over too (`unwrap`), so whoever
  calls the device inside must bracket the call with the wrapper's `enter()` and `leave()`,
  also when it raises, exactly as the wrapper's own methods do: that is what lets a forced
  removal of the child fail its requests with ESHUTDOWN and drain the ones in flight.
- The mapped device (`RoutedIO`) makes the routed call, inside its own gate (a suspend queues
  requests, a revocation fails them, and the in-flight count lets both wait).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from minidisk.device.api import BlockDevice
from minidisk.device.revocable import RevocableDevice

if TYPE_CHECKING:
    from minidisk.dm.mapping import Mapping
    from minidisk.dm.target import Target

# Where a routed request goes: the child's gate (None when the child is not revocable), the
# device to call, the offset there, and a tag the target wants back if the call fails.
Hop = tuple[RevocableDevice | None, BlockDevice, int, int]

# The calls a mapped device routes; a target that overrides one of them intercepts I/O.
ROUTED_CALLS = ("pread", "pread_sparse", "pwrite")


def unwrap(device: BlockDevice) -> tuple[RevocableDevice | None, BlockDevice]:
    """(gate, device to call) for a hop: the gate's `enter()` before the call and `leave()`
    after it (also when it raises) whenever the gate is not None."""
    if isinstance(device, RevocableDevice):
        return device, device.inner
    return None, device


def forwards_only(cls: type, base: type) -> bool:
    """Whether `cls` keeps the routed calls as `base` forwards them."""
    return all(getattr(cls, name) is getattr(base, name) for name in ROUTED_CALLS)


class Routable:
    """The target's side of the contract (see the module docstring); not routable unless a
    target says so."""

    routable: bool = False

    def route(self, offset: int, length: int) -> Hop | None:
        """Where a request inside the target goes, or None to be called with it instead."""
        return None

    def route_failed(self, tag: int, error: OSError) -> None:
        """A routed call with this hop's tag failed (the error is raised on afterwards)."""


class RoutedIO(BlockDevice):
    """The mapped device's reads and writes: routed when the live table allows it, else one
    await of its only target, else of the table.

    pread, pread_sparse and pwrite each spell out the routed call rather than share it: a
    shared coroutine is the layer routing exists to save, and plain helper functions around
    the call measured 0.1 µs more per request (dm's whole overhead over the raw device is
    ~0.2 µs for linear). Striped's `route` inlines its own formula for the same reason.
    """

    # The mapped device's own gate and table, which `MappedDevice` keeps.
    live: Mapping
    read_only: bool
    _blocked: bool
    _inflight: int
    _wait_resumed: Callable[[], Awaitable[None]]
    _done: Callable[[], None]
    _check_writable: Callable[[], None]

    def _route_to(self, mapping: Mapping) -> None:
        """Take the routes of a table that has become live."""
        # A one-segment table (nearly all of them) is called directly: one frame less.
        self._only: Target | None = mapping.targets[0] if len(mapping.targets) == 1 else None
        only = self._only
        self._router: Target | None = only if only is not None and only.routable else None

    async def pread(self, buf: memoryview, offset: int) -> None:
        if self._blocked:
            await self._wait_resumed()
        self._inflight += 1
        try:
            router = self._router
            only = self._only
            hop = router.route(offset, len(buf)) \
                if router is not None and offset + len(buf) <= self.size else None
            if hop is not None:
                gate, child, at, tag = hop
                try:
                    if gate is not None:
                        gate.enter()
                    try:
                        await child.pread(buf, at)
                    finally:
                        if gate is not None:
                            gate.leave()
                except OSError as e:
                    assert router is not None
                    router.route_failed(tag, e)
                    raise
            elif only is not None and offset + len(buf) <= self.size:
                await only.pread(buf, offset)
            else:
                await self.live.pread(buf, offset)
        finally:
            self._done()

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        if self._blocked:
            await self._wait_resumed()
        self._inflight += 1
        try:
            router = self._router
            hop = router.route(offset, len(buf)) \
                if router is not None and offset + len(buf) <= self.size else None
            if hop is not None:
                gate, child, at, tag = hop
                try:
                    if gate is not None:
                        gate.enter()
                    try:
                        holes = await child.pread_sparse(buf, at)
                    finally:
                        if gate is not None:
                            gate.leave()
                except OSError as e:
                    assert router is not None
                    router.route_failed(tag, e)
                    raise
                if holes and at != offset:
                    holes = [(start + offset - at, size) for start, size in holes]
                return holes
            only = self._only
            if only is not None and offset + len(buf) <= self.size:
                return await only.pread_sparse(buf, offset)
            return await self.live.pread_sparse(buf, offset)
        finally:
            self._done()

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self._blocked:
            await self._wait_resumed()
        if self.read_only:
            self._check_writable()
        self._inflight += 1
        try:
            router = self._router
            only = self._only
            hop = router.route(offset, len(buf)) \
                if router is not None and offset + len(buf) <= self.size else None
            if hop is not None:
                gate, child, at, tag = hop
                try:
                    if gate is not None:
                        gate.enter()
                    try:
                        await child.pwrite(buf, at, fua)
                    finally:
                        if gate is not None:
                            gate.leave()
                except OSError as e:
                    assert router is not None
                    router.route_failed(tag, e)
                    raise
            elif only is not None and offset + len(buf) <= self.size:
                await only.pwrite(buf, offset, fua)
            else:
                await self.live.pwrite(buf, offset, fua)
        finally:
            self._done()
