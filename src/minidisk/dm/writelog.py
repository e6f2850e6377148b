"""The dm-log-writes on-disk log format, and replaying a log onto a device.

Layout (MD/dm-log-writes.c; xfstests src/log-writes reads the same), little-endian, in
units of the logged device's sector size `ss` (512 here)::

    block 0        super  {le64 magic, le64 version = 1, le64 nr_entries, le32 sectorsize}
    block 1...     entries, each one header block then its data blocks:
                   header {le64 sector, le64 nr_sectors, le64 flags, le64 data_len}
                   + for a MARK, `data_len` bytes of mark text in the same block;
                   then nr_sectors * ss bytes of written data (none for DISCARD/FLUSH/MARK)

`sector` and `nr_sectors` are in `ss` units. The super's `nr_entries` is rewritten after
each FUA and MARK entry, so a reader trusts entries up to the last of those; the target
logs a final `dm-log-writes-end` mark when its table is dropped.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from minidisk.device.api import BlockDevice

MAGIC = 0x6A736677736872
VERSION = 1

FLUSH = 1 << 0
FUA = 1 << 1
DISCARD = 1 << 2
MARK = 1 << 3
METADATA = 1 << 4

SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")

END_MARK = "dm-log-writes-end"


def encode_super(nr_entries: int, sectorsize: int) -> bytes:
    return SUPER.pack(MAGIC, VERSION, nr_entries, sectorsize).ljust(sectorsize, b"\0")


def encode_entry(sector: int, nr_sectors: int, flags: int, mark: bytes, sectorsize: int) -> bytes:
    header = ENTRY.pack(sector, nr_sectors, flags, len(mark)) + mark
    return header.ljust(sectorsize, b"\0")


def max_mark_length(sectorsize: int) -> int:
    """Longest mark text the kernel keeps (`kstrndup(data, maxsize - 1)`)."""
    return sectorsize - ENTRY.size - 1


@dataclass(frozen=True, slots=True)
class LogEntry:
    index: int
    sector: int  # in sectorsize units
    nr_sectors: int
    flags: int
    mark: str | None
    data_offset: int  # byte offset of the data in the log device

    def describe(self) -> str:
        names = [n for bit, n in ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"),
                                  (MARK, "MARK"), (METADATA, "METADATA")) if self.flags & bit]
        what = "|".join(names) or "WRITE"
        if self.mark is not None:
            return f"{self.index} {what} {self.mark}"
        return f"{self.index} {what} sector {self.sector} count {self.nr_sectors}"


@dataclass(frozen=True, slots=True)
class LogSuper:
    nr_entries: int
    sectorsize: int


async def read_super(log: BlockDevice) -> LogSuper:
    head = bytearray(SUPER.size)
    await log.pread(memoryview(head), 0)
    magic, version, nr_entries, sectorsize = SUPER.unpack(head)
    if magic != MAGIC:
        raise OSError(errno.EINVAL, f"not a dm-log-writes log (magic {magic:#x})")
    if version != VERSION:
        raise OSError(errno.EINVAL, f"unsupported log version {version}")
    if sectorsize < 512 or sectorsize & (sectorsize - 1):
        raise OSError(errno.EINVAL, f"bad log sector size {sectorsize}")
    return LogSuper(nr_entries, sectorsize)


async def entries(log: BlockDevice) -> AsyncIterator[LogEntry]:
    """Every entry the super counts, in log order."""
    sb = await read_super(log)
    ss = sb.sectorsize
    pos = ss
    header = bytearray(ss)
    for index in range(sb.nr_entries):
        if pos + ss > log.size:
            raise OSError(errno.EINVAL, f"log truncated at entry {index}")
        await log.pread(memoryview(header), pos)
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(header)
        mark = None
        if flags & MARK:
            mark = bytes(header[ENTRY.size:ENTRY.size + data_len]).decode(errors="replace")
        pos += ss
        yield LogEntry(index, sector, nr_sectors, flags, mark, pos)
        if not flags & (DISCARD | MARK):
            pos += nr_sectors * ss


async def find_mark(log: BlockDevice, name: str) -> int | None:
    """Index of the first MARK entry called `name`."""
    async for entry in entries(log):
        if entry.mark == name:
            return entry.index
    return None


async def replay(
    log: BlockDevice, device: BlockDevice, *, limit: int | None = None,
    end_mark: str | None = None, start_entry: int = 0, chunk: int = 1 << 20,
) -> int:
    """Apply entries [start_entry, ...) onto `device`; return how many were applied.

    Stops after `limit` entries in all (counted from entry 0, as replay-log's --limit), or
    after the mark `end_mark` (which must exist: replaying "up to a mark" that is not in the
    log would silently replay everything). Discards become trims, flushes flush `device`.
    """
    if end_mark is not None and await find_mark(log, end_mark) is None:
        raise OSError(errno.ENOENT, f"mark {end_mark!r} not found in log")
    sb = await read_super(log)
    ss = sb.sectorsize
    buf = bytearray(chunk)
    applied = 0
    async for entry in entries(log):
        if limit is not None and entry.index >= limit:
            break
        if entry.index >= start_entry:
            await _apply(entry, log, device, ss, buf)
            applied += 1
        if end_mark is not None and entry.mark == end_mark:
            break
    return applied


async def _apply(entry: LogEntry, log: BlockDevice, device: BlockDevice, ss: int,
                 buf: bytearray) -> None:
    offset, length = entry.sector * ss, entry.nr_sectors * ss
    if offset + length > device.size:
        raise OSError(errno.ENOSPC, f"entry {entry.index} writes past the end of the device")
    if entry.flags & MARK:
        return
    if entry.flags & DISCARD:
        if device.caps.trim:
            await device.trim(offset, length)
        else:
            await device.zero(offset, length)
        return
    view = memoryview(buf)
    done = 0
    while done < length:
        n = min(len(buf), length - done)
        await log.pread(view[:n], entry.data_offset + done)
        await device.pwrite(view[:n], offset + done)
        done += n
    if entry.flags & (FLUSH | FUA) and device.caps.flush:
        await device.flush()
