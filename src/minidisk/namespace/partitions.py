"""Partition tables a drivespec can select from: BSD disklabel, MBR (with logical partitions), GPT.

Every lookup returns ``(offset, length)`` in bytes, computed with Python integers, so nothing
wraps at 4 GiB (rump_server shifts 32-bit sector numbers in uint32 and byte-swaps after the
shift, both bugs we do not copy). Lookups read through a `read_at(offset, length) -> bytes`
callable, which returns fewer bytes at the end of the image.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

ReadAt = Callable[[int, int], bytes]

DISKMAGIC = 0x82564557
LABEL_SCAN_BYTES = 64 * 1024  # rump_server reads the first 64 KiB
MAX_LABEL_PARTITIONS = 22  # what rump_server accepts
LABEL_PARTITION_LETTERS = "abcdefghijklmnopqrstuv"  # one per possible label partition

MBR_SECTOR = 512
MBR_EXTENDED_TYPES = {0x05, 0x0F, 0x85}
MBR_GPT_PROTECTIVE = 0xEE
MAX_LOGICAL_PARTITIONS = 128  # an EBR chain longer than this is a loop


class PartitionError(OSError):
    """No usable table, or no such partition (errno ENOENT, as rump_server reports)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


@dataclass(frozen=True)
class Partition:
    offset: int  # bytes
    length: int  # bytes


# BSD disklabel (NetBSD sys/sys/disklabel.h). Offsets of the fields we read:
#   0 d_magic u32, 40 d_secsize u32, 132 d_magic2 u32, 136 d_checksum u16,
#   138 d_npartitions u16, 148 d_partitions[]: 16 bytes each, p_size u32 then p_offset u32.
# The checksum is the XOR of the 16-bit words from d_magic to the end of the last partition;
# with the stored checksum included the XOR is 0, in either byte order.
LABEL_HEADER = 148
LABEL_PARTITION = 16


def _label_partitions(data: bytes, pos: int, order: str) -> int | None:
    """d_npartitions of a label with both magics at `pos` in byte order `order`, else None."""
    if pos + LABEL_HEADER > len(data):
        return None
    magic, = struct.unpack_from(order + "I", data, pos)
    magic2, _, npartitions = struct.unpack_from(order + "IHH", data, pos + 132)
    if magic != DISKMAGIC or magic2 != DISKMAGIC:
        return None
    return int(npartitions)


def find_disklabel(data: bytes) -> tuple[int, str]:
    """(position, struct byte order) of the first valid disklabel in `data`."""
    found_bad = ""
    for pos in range(0, min(len(data), LABEL_SCAN_BYTES) - 3, 4):
        for order in ("<", ">"):
            n = _label_partitions(data, pos, order)
            if n is None:
                continue
            end = pos + LABEL_HEADER + n * LABEL_PARTITION
            if n > MAX_LABEL_PARTITIONS or end > len(data):
                found_bad = (f"disklabel at {pos} has {n} partitions "
                             f"(at most {MAX_LABEL_PARTITIONS})")
                continue
            checksum = 0
            for (word,) in struct.iter_unpack("<H", data[pos:end]):
                checksum ^= word
            if checksum:
                found_bad = f"disklabel at {pos} has a bad checksum"
                continue
            return pos, order
    raise PartitionError(f"disklabel not found{': ' + found_bad if found_bad else ''}")


def disklabel_partition(read_at: ReadAt, letter: str) -> Partition:
    """Partition `letter` (a…v) of the BSD disklabel in the first 64 KiB."""
    index = LABEL_PARTITION_LETTERS.find(letter) if len(letter) == 1 else -1
    if index < 0:
        raise PartitionError(f"{letter!r} is not a disklabel partition letter")
    data = read_at(0, LABEL_SCAN_BYTES)
    pos, order = find_disklabel(data)
    npartitions, = struct.unpack_from(order + "H", data, pos + 138)
    secsize, = struct.unpack_from(order + "I", data, pos + 40)
    if index >= npartitions:
        raise PartitionError(f"partition {letter} not available ({npartitions} in the label)")
    if secsize == 0 or secsize & (secsize - 1) or not 512 <= secsize <= 65536:
        raise PartitionError(f"disklabel sector size {secsize} is not a power of two in 512…64K")
    size, offset = struct.unpack_from(order + "II", data, pos + LABEL_HEADER + index * 16)
    if size == 0:
        raise PartitionError(f"partition {letter} not available (size 0)")
    return Partition(offset * secsize, size * secsize)


# MBR: 4 entries of 16 bytes at 446, signature 55 AA at 510. Entry: status u8, CHS 3 bytes,
# type u8, CHS 3 bytes, first LBA u32, sector count u32 (little endian). Logical partitions
# (5, 6, …) live in a chain of EBRs: entry 0 relative to its EBR, entry 1 the next EBR relative
# to the start of the extended partition.
_MBR_ENTRY = struct.Struct("<B3sB3sII")


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        raise PartitionError("no MBR signature")
    out = []
    for i in range(4):
        _, _, ptype, _, lba, count = _MBR_ENTRY.unpack_from(sector, 446 + 16 * i)
        out.append((ptype, lba, count))
    return out


def mbr_partition(read_at: ReadAt, number: int) -> Partition:
    primaries = _mbr_entries(read_at(0, MBR_SECTOR))
    if number < 1:
        raise PartitionError(f"partition {number} not available (numbers start at 1)")
    if number <= 4:
        ptype, lba, count = primaries[number - 1]
        if ptype == 0 or count == 0:
            raise PartitionError(f"MBR partition {number} is empty")
        return Partition(lba * MBR_SECTOR, count * MBR_SECTOR)
    extended = [(lba, count) for ptype, lba, count in primaries if ptype in MBR_EXTENDED_TYPES]
    if not extended:
        raise PartitionError(f"partition {number} not available (no extended partition)")
    ext_start = extended[0][0]
    ebr = ext_start
    for current in range(5, 5 + MAX_LOGICAL_PARTITIONS):
        (ptype, rel, count), (next_type, next_rel, _) = _mbr_entries(
            read_at(ebr * MBR_SECTOR, MBR_SECTOR))[:2]
        if current == number:
            if ptype == 0 or count == 0:
                raise PartitionError(f"MBR partition {number} is empty")
            return Partition((ebr + rel) * MBR_SECTOR, count * MBR_SECTOR)
        if next_type == 0 or next_rel == 0:
            break
        ebr = ext_start + next_rel
    raise PartitionError(f"partition {number} not available")


# GPT (UEFI 2.x, 5.3): header at LBA 1 — signature "EFI PART" @0, header size u32 @12,
# header CRC32 @16 (computed with itself zeroed), entries LBA u64 @72, entry count u32 @80,
# entry size u32 @84, entries CRC32 @88. Entry: type GUID @0 (all zero = unused),
# first LBA u64 @32, last LBA u64 @40 (inclusive).
def gpt_partition(read_at: ReadAt, number: int, sector: int = 512) -> Partition:
    header = read_at(sector, sector)
    if header[:8] != b"EFI PART":
        raise PartitionError("no GPT header at LBA 1")
    hsize, hcrc = struct.unpack_from("<II", header, 12)
    if not 92 <= hsize <= len(header):
        raise PartitionError(f"GPT header size {hsize} is invalid")
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:hsize]) != hcrc:
        raise PartitionError("GPT header checksum mismatch")
    entries_lba, count, esize, ecrc = struct.unpack_from("<QIII", header, 72)
    if esize < 128 or esize % 8 or count * esize > 16 << 20:
        raise PartitionError(f"GPT entry table of {count}×{esize} bytes is invalid")
    table = read_at(entries_lba * sector, count * esize)
    if len(table) != count * esize or zlib.crc32(table) != ecrc:
        raise PartitionError("GPT entry table checksum mismatch")
    if not 1 <= number <= count:
        raise PartitionError(f"partition {number} not available ({count} GPT entries)")
    entry = table[(number - 1) * esize:number * esize]
    first, last = struct.unpack_from("<QQ", entry, 32)
    if entry[:16] == bytes(16) or last < first:
        raise PartitionError(f"GPT partition {number} is empty")
    return Partition(first * sector, (last - first + 1) * sector)


def numbered_partition(read_at: ReadAt, number: int) -> Partition:
    """Partition `number` (1-based) of a GPT disk, else of an MBR disk."""
    primaries = _mbr_entries(read_at(0, MBR_SECTOR))
    if any(ptype == MBR_GPT_PROTECTIVE for ptype, _, _ in primaries):
        return gpt_partition(read_at, number)
    return mbr_partition(read_at, number)
