"""The block-device interface.

Every device in minidisk (memory, host file, remote NBD export, device-mapper target) is a
`BlockDevice`. The interface is asynchronous so that a device may wait (on a thread pool, on
another server, on a suspended table) without blocking the event loop that serves it; devices
that never wait simply do not await anything, and the server runs them without a task switch.

Buffers are caller-owned `memoryview`s: `pread` fills the buffer the server will send, and
`pwrite` receives the buffer the server read the payload into. Nothing copies to `bytes`.

Errors are `OSError` with an errno. The server (not the device) maps them to NBD codes.

Callers guarantee that every request lies inside the device and that only advertised
operations are called: range and capability checks live in the server core (and in dm
targets, which forward to their children), never in each device.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

# base:allocation flags, shared with the NBD wire format on purpose.
EXTENT_HOLE = 1  # not allocated: a later write may fail with ENOSPC
EXTENT_ZERO = 2  # reads as zeroes

MAX_REQUEST = 32 * 1024 * 1024  # the payload every NBD client may assume (proto.md)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class BlockSize:
    """Block-size constraints, as NBD_INFO_BLOCK_SIZE advertises them."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = MAX_REQUEST

    def __post_init__(self) -> None:
        if not _power_of_two(self.minimum) or self.minimum > 65536:
            raise ValueError(f"minimum block size {self.minimum} is not a power of two <= 64 KiB")
        if not _power_of_two(self.preferred) or self.preferred < max(self.minimum, 512):
            raise ValueError(f"preferred block size {self.preferred} is invalid")
        if self.maximum < self.preferred or self.maximum % self.minimum:
            raise ValueError(f"maximum block size {self.maximum} is invalid")


@dataclass(frozen=True, slots=True)
class Caps:
    """What a device really implements; the server advertises exactly this."""

    read_only: bool = False
    flush: bool = False
    fua: bool = False
    trim: bool = False
    zero: bool = False
    fast_zero: bool = False
    extents: bool = False
    cache: bool = False
    multi_conn: bool = False
    rotational: bool = False


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the device with the same allocation state (EXTENT_* flags)."""

    offset: int
    length: int
    flags: int = 0


class BlockDevice:
    """Base class of every device. Subclasses override what their `caps` advertise.

    Defaults are deliberately honest: an operation a device does not implement raises
    EOPNOTSUPP, and `caps` defaults to a writable device with nothing optional.
    """

    size: int = 0
    block_size: BlockSize = BlockSize()
    caps: Caps = Caps()

    async def pread(self, buf: memoryview, offset: int) -> None:
        """Fill all of `buf` with the bytes at `offset` (the server's reply buffer)."""
        raise OSError(errno.EOPNOTSUPP, "read not implemented")

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        """Write all of `buf` at `offset`; with `fua`, durably before returning. `buf` is
        the server's, valid until this returns: keep a copy, not the view."""
        raise OSError(errno.EOPNOTSUPP, "write not implemented")

    async def flush(self) -> None:
        """Make every completed write durable (NBD_CMD_FLUSH)."""
        raise OSError(errno.EOPNOTSUPP, "flush not implemented")

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard the range: its contents become unspecified (NBD_CMD_TRIM, a hint)."""
        raise OSError(errno.EOPNOTSUPP, "trim not implemented")

    async def zero(
        self, offset: int, length: int, may_trim: bool = False, fast: bool = False,
        fua: bool = False,
    ) -> None:
        """Make the range read as zeroes. With `fast`, fail with ENOTSUP rather than be slow."""
        if fast:
            raise OSError(errno.ENOTSUP, "no fast zero")
        await self.write_zeroes_slowly(offset, length, fua)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Ascending, contiguous extents starting at `offset` (the last may be short)."""
        return [Extent(offset, length, 0)]

    async def pread_sparse(self, buf: memoryview, offset: int) -> list[tuple[int, int]]:
        """Read like `pread`, except where the device reads as zeroes anyway: return those
        ranges as (offset, length), absolute and ascending; their bytes in `buf` are
        unspecified (a device need not spend a memset on them). The server sends them as
        OFFSET_HOLE chunks, so a sparse read costs one pass over the device. Reporting a
        hole is optional (zeroes read as data are never wrong). This default asks `extents`
        first and reads the data between; devices that can tell holes while reading
        (memory, dm targets, a remote export's structured reply) do it in one pass."""
        if not self.caps.extents:
            await self.pread(buf, offset)
            return []
        end = offset + len(buf)
        holes: list[tuple[int, int]] = []
        pos = offset
        for ext in await self.extents(offset, len(buf)):
            if ext.offset != pos or ext.length <= 0:
                break  # not contiguous: read the rest as data
            stop = min(ext.offset + ext.length, end)
            if ext.flags & EXTENT_ZERO:
                holes.append((pos, stop - pos))
            else:
                await self.pread(buf[pos - offset:stop - offset], pos)
            pos = stop
            if pos >= end:
                break
        if pos < end:
            await self.pread(buf[pos - offset:], pos)
        return holes

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint; the default reads and discards, like nbdkit's cache=emulate."""
        chunk = bytearray(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            await self.pread(memoryview(chunk)[:n], offset)
            offset += n

    async def close(self) -> None:
        """Release resources. Called once, when the device leaves the namespace."""

    async def write_zeroes_slowly(self, offset: int, length: int, fua: bool) -> None:
        """Emulate zeroing with writes of a zero buffer (for devices without native zero)."""
        zeroes = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            await self.pwrite(zeroes[:n], offset, fua)
            offset += n

    def describe(self) -> str:
        """One line for status output."""
        return type(self).__name__


async def pread_sparse_at(device: BlockDevice, buf: memoryview, at: int,
                          delta: int) -> list[tuple[int, int]]:
    """`device.pread_sparse(buf, at)` with its holes moved by `delta` (the caller's offset
    minus `at`), for layers that map their offsets onto a child's. A child that cannot
    tell holes (no extents, or one that intercepts reads) is simply read."""
    if not device.caps.extents:
        await device.pread(buf, at)
        return []
    holes = await device.pread_sparse(buf, at)
    if delta and holes:
        holes = [(start + delta, size) for start, size in holes]
    return holes


def add_holes(out: list[tuple[int, int]], holes: list[tuple[int, int]]) -> None:
    """Append ascending `holes` to `out`, merging a hole that continues the last one."""
    for start, size in holes:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((start, size))


def check_range(size: int, offset: int, length: int) -> None:
    """Raise EINVAL for a request that does not lie inside a device of `size` bytes."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EINVAL, f"range {offset}+{length} outside device of {size} bytes")

