"""dm-integrity's on-disk format, as bytes and numbers (MD/dm-integrity.c, DOC/dm-integrity.rst).

Pure: no I/O. A formatted device, from the table's `<offset>` (reserved sectors) on::

    superblock, 8 sectors (the first 64 bytes used, little-endian)
        magic[8] "integrt\\0"    u8 version (1..5 in 6.1)   u8 log2_interleave_sectors
        le16 integrity_tag_size  le32 journal_sections     le64 provided_data_sectors
        le32 flags               u8 log2_sectors_per_block u8 log2_blocks_per_bitmap_bit
        u8 pad[2]                le64 recalc_sector        u8 pad2[8]  u8 salt[16]
    journal: journal_sections sections of section_sectors each; in bitmap mode its first
        sectors hold the dirty bitmap instead while the device is active
    areas: [metadata_run sectors of tags][2^log2_interleave_sectors data sectors] ...

A journal section is 8 sectors of entries (le64 logical sector, the last 8 bytes of each
512-byte data sector, the tag; rounded up to 8 bytes; an unused entry has sector_hi
0xffffffff) and then the entries' data, 504 bytes a sector; every one of its 512-byte
sectors ends with a le64 commit id: one of four ids xor'ed with (section << 32 ^ sector),
so a section half written is not replayed.

A tag is the internal hash of le64(logical sector) and the block, truncated or zero-padded
to the tag size; with fix_hmac the superblock's salt is hashed first.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import crc32c

SECTOR = 512
MAGIC = b"integrt\0"
SB_SECTORS = 8
SB_BYTES = SB_SECTORS * SECTOR
SALT_SIZE = 16
MAX_VERSION = 5  # 6.1 knows versions 1..5 (6, inline mode, came later)

FLAG_HAVE_JOURNAL_MAC = 0x1
FLAG_RECALCULATING = 0x2
FLAG_DIRTY_BITMAP = 0x4
FLAG_FIXED_PADDING = 0x8
FLAG_FIXED_HMAC = 0x10

DEFAULT_INTERLEAVE_SECTORS = 32768
DEFAULT_JOURNAL_SIZE_FACTOR = 7  # the default journal is 1/128 of the device...
DEFAULT_MAX_JOURNAL_SECTORS = 131072  # ...at most 64 MiB (64-bit kernels)
DEFAULT_SECTORS_PER_BITMAP_BIT = 32768
MIN_LOG2_INTERLEAVE = 3
MAX_LOG2_INTERLEAVE = 31
MAX_SECTORS_PER_BLOCK = 8
JOURNAL_BLOCK_SECTORS = 8  # a section's entry sectors
JOURNAL_SECTOR_DATA = SECTOR - 8  # what a journal sector holds before its commit id
JOURNAL_MAC_PER_SECTOR = 8
# The largest tag a journal entry of 8 sectors per block leaves room for.
MAX_TAG_SIZE = JOURNAL_SECTOR_DATA - JOURNAL_MAC_PER_SECTOR - (8 + 8 * MAX_SECTORS_PER_BLOCK)
METADATA_PADDING_SECTORS = 8
BITMAP_BLOCK_BYTES = 4096
DISCARD_FILLER = 0xF6
N_COMMIT_IDS = 4
COMMIT_IDS = tuple(0x1111111111111111 * (k + 1) for k in range(N_COMMIT_IDS))
UNUSED_SECTOR_HI = 0xFFFFFFFF

_SB = struct.Struct("<8sBBHIQIBB2xQ8x16s")


class FormatError(ValueError):
    """A superblock or geometry the kernel refuses; the message is the kernel's ti->error."""


@dataclass(frozen=True, slots=True)
class Superblock:
    version: int = 1
    log2_interleave_sectors: int = 0
    tag_size: int = 0
    journal_sections: int = 0
    provided_data_sectors: int = 0
    flags: int = 0
    log2_sectors_per_block: int = 0
    log2_blocks_per_bitmap_bit: int = 0
    recalc_sector: int = 0
    salt: bytes = bytes(SALT_SIZE)
    magic: bytes = MAGIC

    def pack(self) -> bytes:
        return _SB.pack(self.magic, self.version, self.log2_interleave_sectors,
                        self.tag_size, self.journal_sections, self.provided_data_sectors,
                        self.flags, self.log2_sectors_per_block,
                        self.log2_blocks_per_bitmap_bit, self.recalc_sector, self.salt)

    def into(self, area: bytes) -> bytes:
        """`area` (the 8 sectors as read) with this superblock in its first 64 bytes."""
        return self.pack() + area[_SB.size:SB_BYTES]

    @classmethod
    def unpack(cls, data: bytes) -> Superblock:
        (magic, version, log2_il, tag, sections, provided, flags, log2_spb, log2_bpb,
         recalc, salt) = _SB.unpack_from(data)
        return cls(version, log2_il, tag, sections, provided, flags, log2_spb, log2_bpb,
                   recalc, salt, magic)

    def with_version(self, mode: str, meta_device: bool = False) -> Superblock:
        """sb_set_version: the lowest version that has every feature in use."""
        if self.flags & FLAG_FIXED_HMAC:
            version = 5
        elif self.flags & FLAG_FIXED_PADDING:
            version = 4
        elif mode == "B" or self.flags & FLAG_DIRTY_BITMAP:
            version = 3
        elif meta_device or self.flags & FLAG_RECALCULATING:
            version = 2
        else:
            version = 1
        return replace(self, version=version)


# Internal hashes by the kernel's crypto API names. Each gives its digest of a block's
# sector number and data; the kernel's crc32c shash ends with le32(~crc), xxhash64 with
# le64(digest), sha256 as usual.

Data = bytes | bytearray | memoryview
Hasher = Callable[[bytes, Data], bytes]  # (le64 sector [+ salt before it], data) -> digest


@dataclass(frozen=True, slots=True)
class InternalHash:
    name: str
    digest_size: int
    digest: Hasher


def _crc32c(head: bytes, data: Data) -> bytes:
    return struct.pack("<I", crc32c.crc32c(data, crc32c.crc32c(head)))


def _sha256(head: bytes, data: Data) -> bytes:
    h = hashlib.sha256(head)
    h.update(data)
    return h.digest()


_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
_M64 = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def xxh64(data: Data, seed: int = 0) -> int:
    """XXH64 (the kernel's xxhash64 shash with its default seed 0). In Python: only for
    devices that ask for it; crc32c is the fast one."""
    n = len(data)
    pos = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M64, (seed + _P2) & _M64, seed, (seed - _P1) & _M64]
        lanes = struct.unpack_from(f"<{(n // 32) * 4}Q", data)
        for i in range(0, len(lanes), 4):
            v = [_round(v[k], lanes[i + k]) for k in range(4)]
        pos = (n // 32) * 32
        acc = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for lane in v:
            acc = ((acc ^ _round(0, lane)) * _P1 + _P4) & _M64
    else:
        acc = (seed + _P5) & _M64
    acc = (acc + n) & _M64
    while pos + 8 <= n:
        (k1,) = struct.unpack_from("<Q", data, pos)
        acc = (_rotl(acc ^ _round(0, k1), 27) * _P1 + _P4) & _M64
        pos += 8
    if pos + 4 <= n:
        (k2,) = struct.unpack_from("<I", data, pos)
        acc = (_rotl(acc ^ (k2 * _P1) & _M64, 23) * _P2 + _P3) & _M64
        pos += 4
    while pos < n:
        acc = (_rotl(acc ^ (data[pos] * _P5) & _M64, 11) * _P1) & _M64
        pos += 1
    acc ^= acc >> 33
    acc = (acc * _P2) & _M64
    acc ^= acc >> 29
    acc = (acc * _P3) & _M64
    return acc ^ (acc >> 32)


def _xxhash64(head: bytes, data: Data) -> bytes:
    return struct.pack("<Q", xxh64(head + bytes(data)))


HASHES = {h.name: h for h in (
    InternalHash("crc32c", 4, _crc32c),
    InternalHash("sha256", 32, _sha256),
    InternalHash("xxhash64", 8, _xxhash64),
)}
KEYED = {"hmac(sha256)": hashlib.sha256, "hmac(sha512)": hashlib.sha512}


def internal_hash(name: str, key: bytes | None) -> InternalHash:
    """The hash a table's `internal_hash:NAME[:HEXKEY]` names; FormatError with the
    kernel's words otherwise."""
    if name in KEYED:
        if key is None:
            raise FormatError("Error setting internal hash key")
        algo = KEYED[name]

        def keyed(head: bytes, data: Data) -> bytes:
            h = hmac.new(key, head, algo)
            h.update(data)
            return h.digest()
        return InternalHash(name, algo().digest_size, keyed)
    if name not in HASHES:
        raise FormatError("Invalid internal hash")
    if key is not None:  # an unkeyed shash refuses setkey
        raise FormatError("Error setting internal hash key")
    return HASHES[name]


def tag_of(hash_: InternalHash, tag_size: int, sector: int, block: Data,
           salt: bytes | None = None) -> bytes:
    """integrity_sector_checksum: the tag of `block` at logical `sector`."""
    head = struct.pack("<Q", sector)
    if salt is not None:
        head = salt + head
    digest = hash_.digest(head, block)
    return digest[:tag_size].ljust(tag_size, b"\0")


_LE64 = struct.Struct("<Q")
_LE32 = struct.Struct("<I")


def tags_of(hash_: InternalHash, tag_size: int, sector: int, sectors_per_block: int,
            data: Data, salt: bytes | None = None) -> bytes:
    """The tags of the blocks of `data`, the first at logical `sector`, end to end. The
    common case (crc32c, 4-byte tags, no salt) without a call per block beyond the crc."""
    block = sectors_per_block * SECTOR
    view = memoryview(data)
    n = len(view) // block
    if hash_.name == "crc32c" and tag_size == 4 and salt is None:
        crc, pack, out = crc32c.crc32c, _LE64.pack, bytearray(4 * n)
        for i in range(n):
            _LE32.pack_into(out, 4 * i, crc(view[i * block:(i + 1) * block],
                                            crc(pack(sector + i * sectors_per_block))))
        return bytes(out)
    return b"".join(tag_of(hash_, tag_size, sector + i * sectors_per_block,
                           view[i * block:(i + 1) * block], salt) for i in range(n))


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where everything is, for a superblock over a device of `device_sectors` with the
    superblock at sector `start` (calculate_journal_section_size, calculate_device_limits)."""

    sb: Superblock
    start: int
    device_sectors: int

    @property
    def sectors_per_block(self) -> int:
        return 1 << self.sb.log2_sectors_per_block

    @property
    def interleave(self) -> int:
        return 1 << self.sb.log2_interleave_sectors

    @property
    def journal_entry_size(self) -> int:
        raw = 8 + 8 * self.sectors_per_block + self.sb.tag_size
        return (raw + 7) // 8 * 8

    @property
    def entries_per_sector(self) -> int:
        space = JOURNAL_SECTOR_DATA
        if self.sb.flags & FLAG_HAVE_JOURNAL_MAC:
            space -= JOURNAL_MAC_PER_SECTOR
        return space // self.journal_entry_size

    @property
    def section_entries(self) -> int:
        return self.entries_per_sector * JOURNAL_BLOCK_SECTORS

    @property
    def section_sectors(self) -> int:
        return (self.section_entries << self.sb.log2_sectors_per_block) + JOURNAL_BLOCK_SECTORS

    @property
    def journal_entries(self) -> int:
        return self.section_entries * self.sb.journal_sections

    @property
    def initial_sectors(self) -> int:
        """Superblock and journal."""
        return SB_SECTORS + self.section_sectors * self.sb.journal_sections

    @property
    def metadata_run(self) -> int:
        """Tag sectors before each area's data, padded to 4 KiB (fix_padding) or, as
        volumes made before it still are, to 128 KiB."""
        pad = (METADATA_PADDING_SECTORS * SECTOR if self.sb.flags & FLAG_FIXED_PADDING
               else SECTOR << METADATA_PADDING_SECTORS)
        tags = self.sb.tag_size << (self.sb.log2_interleave_sectors
                                    - self.sb.log2_sectors_per_block)
        return -(-tags // pad) * pad // SECTOR

    def data_sector(self, logical: int) -> int:
        """get_data_sector: where logical sector `logical` lives on the device."""
        area, offset = divmod(logical, self.interleave)
        return (self.start + self.initial_sectors + area * self.interleave
                + (area + 1) * self.metadata_run + offset)

    def tag_byte(self, logical: int) -> int:
        """Device byte of the tag of the block at logical sector `logical`."""
        area, offset = divmod(logical, self.interleave)
        area_start = (self.start + self.initial_sectors
                      + area * (self.interleave + self.metadata_run)) * SECTOR
        return area_start + (offset >> self.sb.log2_sectors_per_block) * self.sb.tag_size

    def fits(self, provided: int) -> bool:
        """calculate_device_limits for `provided` data sectors."""
        if self.initial_sectors + METADATA_PADDING_SECTORS >= self.device_sectors:
            return False
        last = self.data_sector(provided - 1)
        return self.start <= last < self.device_sectors

    def provided_data_sectors(self) -> int:
        """get_provided_data_sectors: bit by bit from the top, the most sectors whose last
        one still fits (a multiple of 8)."""
        provided = 0
        for bit in range(self.device_sectors.bit_length() - 1, 2, -1):
            if self.fits(provided | 1 << bit):
                provided |= 1 << bit
        return provided

    def buffer_sectors_log2(self, buffer_sectors: int) -> int:
        """The tag buffers' size as the table reports it: rounded down to a power of two,
        at most the metadata run's alignment."""
        log2 = min(max(buffer_sectors, 1).bit_length() - 1, 31 - 9)
        run = self.metadata_run
        return min(log2, (run & -run).bit_length() - 1)


def bitmap_log2_sectors_per_bit(geo: Geometry, sectors_per_bit: int | None) -> int:
    """log2 of the sectors one bitmap bit covers: as asked (default 32768), at least a
    block, and grown until the bitmap fits in the journal area."""
    log2 = (DEFAULT_SECTORS_PER_BITMAP_BIT.bit_length() - 1 if sectors_per_bit is None
            else max(sectors_per_bit, 1).bit_length() - 1 if sectors_per_bit else 0)
    log2 = max(log2, geo.sb.log2_sectors_per_block)
    bits_in_journal = min((geo.section_sectors * geo.sb.journal_sections) << (9 + 3),
                          2**32 - 1)
    provided = geo.provided_data_sectors()
    if bits_in_journal:
        while bits_in_journal < (provided + (1 << log2) - 1) >> log2:
            log2 += 1
    return log2


def new_superblock(device_sectors: int, start: int, tag_size: int, log2_spb: int,
                   journal_sectors: int | None, interleave_sectors: int, fix_padding: bool,
                   fix_hmac_salt: bytes | None, journal_mac: bool) -> Superblock:
    """initialize_superblock (no meta_device): what the kernel writes on first use."""
    flags = (FLAG_HAVE_JOURNAL_MAC if journal_mac else 0)
    if fix_hmac_salt is not None:
        flags |= FLAG_FIXED_HMAC
    if fix_padding:
        flags |= FLAG_FIXED_PADDING
    sb = Superblock(tag_size=tag_size, log2_sectors_per_block=log2_spb, flags=flags,
                    salt=fix_hmac_salt or bytes(SALT_SIZE))
    section = Geometry(sb, start, device_sectors).section_sectors
    if journal_sectors is None:
        journal_sectors = min(DEFAULT_MAX_JOURNAL_SECTORS,
                              device_sectors >> DEFAULT_JOURNAL_SIZE_FACTOR)
    interleave = interleave_sectors or DEFAULT_INTERLEAVE_SECTORS
    log2_il = min(max(interleave.bit_length() - 1, MIN_LOG2_INTERLEAVE), MAX_LOG2_INTERLEAVE)
    sb = replace(sb, journal_sections=max(journal_sectors // section, 1),
                 log2_interleave_sectors=log2_il)
    provided = Geometry(sb, start, device_sectors).provided_data_sectors()
    if not provided:
        raise FormatError("Could not initialize superblock")
    return replace(sb, provided_data_sectors=provided)


def commit_id(section: int, sector: int, seq: int) -> bytes:
    return struct.pack("<Q", COMMIT_IDS[seq] ^ ((section << 32) ^ sector))


def empty_journal(geo: Geometry, first_sector: int, sectors: int, seq: int = 0) -> bytes:
    """init_journal's bytes for journal sectors [first, first+sectors): zeroes, every
    entry unused, each sector ending with its commit id of sequence `seq`."""
    out = bytearray(sectors * SECTOR)
    section_sectors = geo.section_sectors
    per_sector = geo.entries_per_sector
    size = geo.journal_entry_size
    unused = struct.pack("<I", UNUSED_SECTOR_HI)
    for n in range(sectors):
        section, j = divmod(first_sector + n, section_sectors)
        base = n * SECTOR
        if j < JOURNAL_BLOCK_SECTORS:
            for e in range(per_sector):
                out[base + e * size + 4:base + e * size + 8] = unused
        out[base + JOURNAL_SECTOR_DATA:base + SECTOR] = commit_id(section, j, seq)
    return bytes(out)


def journal_is_empty(geo: Geometry, journal: bytes) -> bool:
    """True if every sector of the journal carries a known commit id and no entry is in
    use: nothing to replay (what a clean D or B mode device, or a fresh one, has)."""
    section_sectors = geo.section_sectors
    ids = set(COMMIT_IDS)
    for n in range(len(journal) // SECTOR):
        section, j = divmod(n, section_sectors)
        base = n * SECTOR
        (cid,) = struct.unpack_from("<Q", journal, base + JOURNAL_SECTOR_DATA)
        if cid ^ ((section << 32) ^ j) not in ids:
            return False
        if j < JOURNAL_BLOCK_SECTORS:
            for e in range(geo.entries_per_sector):
                (hi,) = struct.unpack_from("<I", journal, base + e * geo.journal_entry_size + 4)
                if hi != UNUSED_SECTOR_HI:
                    return False
    return True


# The journal (mode J): sections written whole with one commit id sequence, replayed on
# the next load from the oldest consistent section on.

@dataclass(frozen=True, slots=True)
class JournalEntry:
    sector: int  # logical sector of the block
    data: bytes  # the whole block, its sectors' last 8 bytes restored
    tag: bytes


def section_image(geo: Geometry, section: int, seq: int, entries: list[JournalEntry]) -> bytes:
    """A journal section holding `entries` (at most section_entries) in order, each sector
    ending with commit id `seq`: what the kernel's integrity_commit writes."""
    out = bytearray(geo.section_sectors * SECTOR)
    size, spb = geo.journal_entry_size, geo.sectors_per_block
    unused = struct.pack("<I", UNUSED_SECTOR_HI)
    for n in range(geo.section_entries):
        at = (n % JOURNAL_BLOCK_SECTORS) * SECTOR + (n // JOURNAL_BLOCK_SECTORS) * size
        if n >= len(entries):
            out[at + 4:at + 8] = unused
            continue
        e = entries[n]
        last = b"".join(e.data[s * SECTOR + JOURNAL_SECTOR_DATA:(s + 1) * SECTOR]
                        for s in range(spb))
        out[at:at + 8 + 8 * spb + len(e.tag)] = struct.pack("<Q", e.sector) + last + e.tag
        for s in range(spb):
            d = (JOURNAL_BLOCK_SECTORS + (n << geo.sb.log2_sectors_per_block) + s) * SECTOR
            out[d:d + JOURNAL_SECTOR_DATA] = e.data[s * SECTOR:s * SECTOR + JOURNAL_SECTOR_DATA]
    for j in range(geo.section_sectors):
        out[j * SECTOR + JOURNAL_SECTOR_DATA:(j + 1) * SECTOR] = commit_id(section, j, seq)
    return bytes(out)


def section_entries(geo: Geometry, raw: bytes) -> list[JournalEntry]:
    """The used entries of one section's bytes, in order (do_journal_write's view)."""
    out = []
    size, spb, tag = geo.journal_entry_size, geo.sectors_per_block, geo.sb.tag_size
    for n in range(geo.section_entries):
        at = (n % JOURNAL_BLOCK_SECTORS) * SECTOR + (n // JOURNAL_BLOCK_SECTORS) * size
        (lo, hi) = struct.unpack_from("<II", raw, at)
        if hi == UNUSED_SECTOR_HI:
            continue
        block = bytearray()
        for s in range(spb):
            d = (JOURNAL_BLOCK_SECTORS + (n << geo.sb.log2_sectors_per_block) + s) * SECTOR
            block += raw[d:d + JOURNAL_SECTOR_DATA]
            block += raw[at + 8 + 8 * s:at + 16 + 8 * s]
        t = at + 8 + 8 * spb
        out.append(JournalEntry(lo | hi << 32, bytes(block), raw[t:t + tag]))
    return out


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What replay_journal decides from a journal's bytes."""

    replay: tuple[int, ...]  # sections to write back, oldest first
    continue_section: int  # where the next commit goes
    commit_seq: int  # with which commit id sequence
    clear: tuple[tuple[int, int, int], ...]  # init_journal (first, count, seq) to write
    corrupt: bool = False  # a commit id of none of the four: the kernel fails the device


def _seq_of(section: int, sector: int, cid: int) -> int | None:
    for k, base in enumerate(COMMIT_IDS):
        if base ^ ((section << 32) ^ sector) == cid:
            return k
    return None


def plan_replay(geo: Geometry, journal: bytes, mode: str) -> ReplayPlan:
    """replay_journal, as 6.1 has it: the sections written in this pass of the ring carry
    the last commit sequence used, the ones after them the one before; replay from the
    oldest on while every sector of a section carries the sequence expected there, and
    continue there if the whole ring was consistent (and, outside J mode, empty), else
    clear the journal."""
    n_sections = geo.sb.journal_sections
    sectors = geo.section_sectors

    def cid(i: int, j: int) -> int:
        (value,) = struct.unpack_from("<Q", journal, (i * sectors + j) * SECTOR
                                      + JOURNAL_SECTOR_DATA)
        return int(value)

    def nxt(seq: int) -> int:
        return (seq + 1) % N_COMMIT_IDS

    def prev(seq: int) -> int:
        return (seq + N_COMMIT_IDS - 1) % N_COMMIT_IDS

    def cleared(write_start: int, last_used: int, corrupt: bool = False) -> ReplayPlan:
        erase = prev(prev(last_used))
        ranges = [(write_start, 1, erase)]
        if n_sections >= 2:
            ranges.append(((write_start + 1) % n_sections, n_sections - 2, erase))
            ranges.append(((write_start + n_sections - 1) % n_sections, 1, erase))
        return ReplayPlan((), 0, nxt(erase), tuple(r for r in ranges if r[1]), corrupt)

    used = [False] * N_COMMIT_IDS
    last_section = [0] * N_COMMIT_IDS
    empty = True
    for i in range(n_sections):
        for j in range(sectors):
            k = _seq_of(i, j, cid(i, j))
            if k is None:
                return cleared(0, 0, corrupt=True)
            used[k] = True
            last_section[k] = i
        if empty and section_entries(geo, journal[i * sectors * SECTOR:
                                                  (i + 1) * sectors * SECTOR]):
            empty = False
    if not used[N_COMMIT_IDS - 1]:
        unused = N_COMMIT_IDS - 1
        while unused and not used[unused - 1]:
            unused -= 1
    else:
        free = [k for k in range(N_COMMIT_IDS) if not used[k]]
        if not free:
            return cleared(0, 0, corrupt=True)
        unused = free[0]
    last_used = prev(unused)
    want = prev(last_used)
    if not used[want] and used[prev(want)]:
        empty = True
    write_start = last_section[last_used] + 1
    if write_start >= n_sections:
        want = nxt(want)
        write_start -= n_sections
    i, consistent = write_start, 0
    while consistent < n_sections:
        if any(cid(i, j) != int.from_bytes(commit_id(i, j, want), "little")
               for j in range(sectors)):
            break
        consistent += 1
        i += 1
        if i >= n_sections:
            want = nxt(want)
            i -= n_sections
    replay = () if empty else tuple((write_start + k) % n_sections for k in range(consistent))
    if consistent == n_sections and (mode == "J" or empty):
        return ReplayPlan(replay, write_start, want, ())
    plan = cleared(write_start, last_used)
    return replace(plan, replay=replay)
