"""dm-thin's metadata blocks as bytes: checksums, the superblock, btree nodes, space-map blocks.

Everything is little-endian in 4096-byte blocks, and every block begins with a le32
checksum and names its own block number, so a block read from the wrong place is refused.
The checksum is the kernel's `dm_bm_checksum`: CRC-32C seeded with ~0 and not inverted at
the end, xor a salt per block type, over the block after the checksum field. Layouts, from
drivers/md/dm-thin-metadata.c and drivers/md/persistent-data/ (dm-btree-internal.h,
dm-space-map-common.h):

    superblock (block 0)           btree node                    bitmap block
    le32 csum                      le32 csum                     le32 csum
    le32 flags (1 = needs_check)   le32 flags (1 internal,       le32 not_used
    le64 blocknr                            2 leaf)              le64 blocknr
    u8   uuid[16]                  le64 blocknr                  2 bits per block from
    le64 magic (27022010)          le32 nr_entries                 byte 16: in each le64
    le32 version (2)               le32 max_entries                word, entry i has bit
    le32 time                      le32 value_size                 2i = high, 2i+1 = low
    le64 trans_id                  le32 padding
    le64 held_root                 le64 keys[max_entries]        metadata index block
    u8   data_sm_root[128]         values[max_entries]           le32 csum
    u8   metadata_sm_root[128]                                   le32 padding
    le64 data_mapping_root         sm root (in the superblock)   le64 blocknr
    le64 device_details_root       le64 nr_blocks                index entry[255]:
    le32 data_block_size           le64 nr_allocated               le64 blocknr
    le32 metadata_block_size (8)   le64 bitmap_root                le32 nr_free
    le64 metadata_nr_blocks        le64 ref_count_root             le32 none_free_before
    le32 compat_flags
    le32 compat_ro_flags
    le32 incompat_flags
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c

BLOCK_SIZE = 4096
SECTORS_PER_BLOCK = BLOCK_SIZE // 512
MAGIC = 27022010
VERSION = 2
NEEDS_CHECK = 1  # superblock flag

# Per-type salts (dm-thin-metadata.c, dm-btree-internal.h, dm-space-map-common.c).
SUPERBLOCK_SALT = 160774
BTREE_SALT = 121107
BITMAP_SALT = 240779
INDEX_SALT = 160478

INTERNAL_NODE = 1
LEAF_NODE = 2

SUPERBLOCK = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
SM_ROOT = struct.Struct("<QQQQ")
NODE_HEADER = struct.Struct("<IIQIIII")
BITMAP_HEADER = struct.Struct("<IIQ")
INDEX_ENTRY = struct.Struct("<QII")
INDEX_HEADER = struct.Struct("<IIQ")

ENTRIES_PER_BITMAP = (BLOCK_SIZE - BITMAP_HEADER.size) * 4  # 16320
MAX_METADATA_BITMAPS = (BLOCK_SIZE - INDEX_HEADER.size) // INDEX_ENTRY.size  # 255
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP  # what one index can cover


class MetadataError(OSError):
    """Metadata that is not what the kernel would have written (EILSEQ, as its validators)."""

    def __init__(self, message: str) -> None:
        super().__init__(84, message)  # EILSEQ


def checksum(data: bytes | bytearray | memoryview, salt: int) -> int:
    return (crc32c.crc32c(data) ^ 0xFFFFFFFF ^ salt) & 0xFFFFFFFF


def seal(block: bytearray, salt: int, length: int = BLOCK_SIZE) -> bytearray:
    """Write the checksum of block[4:length] into the block's first le32."""
    struct.pack_into("<I", block, 0, checksum(memoryview(block)[4:length], salt))
    return block


def verify(block: bytes | bytearray, blocknr: int, salt: int, what: str,
           length: int = BLOCK_SIZE) -> None:
    """Refuse a block whose checksum or self-reported location is wrong."""
    stored, = struct.unpack_from("<I", block, 0)
    if stored != checksum(memoryview(block)[4:length], salt):
        raise MetadataError(f"{what} checksum failed at block {blocknr}")
    claimed, = struct.unpack_from("<Q", block, 8)
    if claimed != blocknr:
        raise MetadataError(f"{what} at block {blocknr} claims to be block {claimed}")


@dataclass(slots=True)
class SpaceMapRoot:
    nr_blocks: int = 0
    nr_allocated: int = 0
    bitmap_root: int = 0
    ref_count_root: int = 0

    def pack(self) -> bytes:
        return SM_ROOT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root,
                            self.ref_count_root).ljust(128, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> SpaceMapRoot:
        return cls(*SM_ROOT.unpack_from(raw, 0))


@dataclass(slots=True)
class Superblock:
    flags: int = 0
    blocknr: int = 0
    uuid: bytes = bytes(16)
    version: int = VERSION
    time: int = 0
    trans_id: int = 0
    held_root: int = 0
    data_sm: bytes = bytes(128)  # a packed SpaceMapRoot (zero in a held metadata snapshot)
    metadata_sm: bytes = bytes(128)
    data_mapping_root: int = 0
    device_details_root: int = 0
    data_block_size: int = 0  # sectors
    metadata_nr_blocks: int = 0
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    def pack(self) -> bytearray:
        block = bytearray(BLOCK_SIZE)
        SUPERBLOCK.pack_into(
            block, 0, 0, self.flags, self.blocknr, self.uuid, MAGIC, self.version, self.time,
            self.trans_id, self.held_root, self.data_sm, self.metadata_sm,
            self.data_mapping_root, self.device_details_root, self.data_block_size,
            SECTORS_PER_BLOCK, self.metadata_nr_blocks, self.compat_flags,
            self.compat_ro_flags, self.incompat_flags)
        return seal(block, SUPERBLOCK_SALT)

    @classmethod
    def unpack(cls, block: bytes, blocknr: int = 0) -> Superblock:
        verify(block, blocknr, SUPERBLOCK_SALT, "superblock")
        (_, flags, nr, uuid, magic, version, time, trans_id, held_root, data_sm, metadata_sm,
         mapping_root, details_root, data_block_size, metadata_block_size,
         metadata_nr_blocks, compat, compat_ro, incompat) = SUPERBLOCK.unpack_from(block, 0)
        if magic != MAGIC:
            raise MetadataError(f"superblock magic {magic}, not {MAGIC}")
        if version not in (1, 2):
            raise MetadataError(f"unsupported metadata version {version}")
        if metadata_block_size != SECTORS_PER_BLOCK:
            raise MetadataError(f"metadata block size {metadata_block_size} sectors, not 8")
        return cls(flags, nr, uuid, version, time, trans_id, held_root, data_sm, metadata_sm,
                   mapping_root, details_root, data_block_size, metadata_nr_blocks, compat,
                   compat_ro, incompat)


def max_entries(value_size: int) -> int:
    """calc_max_entries: as many (key, value) pairs as fit, rounded down to a multiple of 3
    (so that a full node splits into nodes no checker calls underfull)."""
    n = (BLOCK_SIZE - NODE_HEADER.size) // (8 + value_size)
    return n // 3 * 3


def pack_node(blocknr: int, flags: int, keys: list[int], values: list[int],
              value_size: int) -> bytearray:
    """A btree node; values are little-endian integers of `value_size` bytes."""
    cap = max_entries(value_size)
    n = len(keys)
    block = bytearray(BLOCK_SIZE)
    NODE_HEADER.pack_into(block, 0, 0, flags, blocknr, n, cap, value_size, 0)
    struct.pack_into(f"<{n}Q", block, NODE_HEADER.size, *keys)
    at = NODE_HEADER.size + 8 * cap
    if value_size == 8:
        struct.pack_into(f"<{n}Q", block, at, *values)
    elif value_size == 4:
        struct.pack_into(f"<{n}I", block, at, *values)
    else:
        block[at:at + n * value_size] = b"".join(v.to_bytes(value_size, "little")
                                                 for v in values)
    return seal(block, BTREE_SALT)


def unpack_node(block: bytes, blocknr: int) -> tuple[int, list[int], list[int], int]:
    """(flags, keys, values, value_size) of a btree node, checked as the kernel checks one."""
    verify(block, blocknr, BTREE_SALT, "btree node")
    _, flags, _, n, cap, value_size, _ = NODE_HEADER.unpack_from(block, 0)
    if cap % 3 or NODE_HEADER.size + cap * (8 + value_size) > BLOCK_SIZE or n > cap:
        raise MetadataError(f"btree node {blocknr}: bad entry counts {n}/{cap}")
    if flags not in (INTERNAL_NODE, LEAF_NODE):
        raise MetadataError(f"btree node {blocknr}: bad flags {flags}")
    keys = list(struct.unpack_from(f"<{n}Q", block, NODE_HEADER.size))
    at = NODE_HEADER.size + 8 * cap
    if value_size == 8:
        values = list(struct.unpack_from(f"<{n}Q", block, at))
    elif value_size == 4:
        values = list(struct.unpack_from(f"<{n}I", block, at))
    else:
        values = [int.from_bytes(block[at + i * value_size:at + (i + 1) * value_size],
                                 "little") for i in range(n)]
    return flags, keys, values, value_size


# Bitmaps: one byte holds four 2-bit entries; entry j of a byte has its high bit at bit 2j
# and its low bit at bit 2j+1 (sm_lookup_bitmap's test_bit_le(2b) is the high bit).
_DECODE = [tuple(((byte >> (2 * j)) & 1) << 1 | ((byte >> (2 * j + 1)) & 1)
                 for j in range(4)) for byte in range(256)]
_ENCODE = {entries: byte for byte, entries in enumerate(_DECODE)}


def pack_bitmap(blocknr: int, counts: list[int]) -> bytearray:
    """A bitmap block for up to ENTRIES_PER_BITMAP counts (3 stands for 3 or more)."""
    block = bytearray(BLOCK_SIZE)
    BITMAP_HEADER.pack_into(block, 0, 0, 0, blocknr)
    c = [min(x, 3) for x in counts] + [0] * (-len(counts) % 4)
    block[16:16 + len(c) // 4] = bytes(_ENCODE[(c[i], c[i + 1], c[i + 2], c[i + 3])]
                                       for i in range(0, len(c), 4))
    return seal(block, BITMAP_SALT)


def unpack_bitmap(block: bytes, blocknr: int) -> list[int]:
    """All ENTRIES_PER_BITMAP 2-bit entries of a bitmap block."""
    verify(block, blocknr, BITMAP_SALT, "bitmap")
    out: list[int] = []
    decode = _DECODE
    for byte in block[16:]:
        out.extend(decode[byte])
    return out


def pack_index(blocknr: int, entries: list[tuple[int, int, int]]) -> bytearray:
    """The metadata space map's index block: (bitmap blocknr, nr_free, none_free_before)."""
    block = bytearray(BLOCK_SIZE)
    INDEX_HEADER.pack_into(block, 0, 0, 0, blocknr)
    for i, entry in enumerate(entries):
        INDEX_ENTRY.pack_into(block, INDEX_HEADER.size + i * INDEX_ENTRY.size, *entry)
    return seal(block, INDEX_SALT)


def unpack_index(block: bytes, blocknr: int, count: int) -> list[tuple[int, int, int]]:
    verify(block, blocknr, INDEX_SALT, "space map index")
    return [INDEX_ENTRY.unpack_from(block, INDEX_HEADER.size + i * INDEX_ENTRY.size)
            for i in range(count)]


def pack_index_value(entry: tuple[int, int, int]) -> int:
    """A data space map index entry as the 16-byte btree value it is stored as."""
    blocknr, nr_free, none_free_before = entry
    return blocknr | nr_free << 64 | none_free_before << 96


def unpack_index_value(value: int) -> tuple[int, int, int]:
    return value & (2**64 - 1), value >> 64 & 0xFFFFFFFF, value >> 96 & 0xFFFFFFFF


def pack_details(mapped_blocks: int, transaction_id: int, creation_time: int,
                 snapshotted_time: int) -> int:
    """A device-details value (24 bytes: le64, le64, le32, le32) as an integer."""
    return (mapped_blocks | transaction_id << 64 | creation_time << 128
            | snapshotted_time << 160)


def unpack_details(value: int) -> tuple[int, int, int, int]:
    m = 2**64 - 1
    return value & m, value >> 64 & m, value >> 128 & 0xFFFFFFFF, value >> 160 & 0xFFFFFFFF


def pack_mapping(data_block: int, time: int) -> int:
    """A mapping-tree leaf value: data block in the high 40 bits, 24-bit time below."""
    return data_block << 24 | (time & 0xFFFFFF)


def unpack_mapping(value: int) -> tuple[int, int]:
    return value >> 24, value & 0xFFFFFF
