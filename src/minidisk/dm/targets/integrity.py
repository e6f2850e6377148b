"""`integrity`: dm-integrity with an internal hash, in the kernel's on-disk format
(MD/dm-integrity.c as in 6.1; the format is `integrity_format.py`).

    integrity <dev> <reserved_sectors> <tag_size|-> <D|B|R|J> <#opt> [opt...]
      journal_sectors:N interleave_sectors:N buffer_sectors:N journal_watermark:PCT
      commit_time:MS internal_hash:ALG[:HEXKEY] block_size:BYTES sectors_per_bit:N
      bitmap_flush_interval:MS recalculate allow_discards fix_padding fix_hmac
      legacy_recalculate

Every block written gets its tag (the internal hash of its logical sector and data) in the
tag area of its interleave area; every block read is checked against its tag, and a read
with any bad block fails whole with EILSEQ (what the kernel's BLK_STS_PROTECTION gives a
reader; NBD has no such code and sends EIO) and counts one mismatch, as 6.1 counts one per
failed bio. A rewrite gives the block a new tag.

First use, as the kernel documents it: a superblock area of zeroes is formatted when the
table is loaded (with any length: the table's length must not exceed what the format
provides, so load it with one sector, read `provided_data_sectors` from the superblock,
and load it again with that length). A superblock neither valid nor zero is refused.

Modes: D writes data and tags with no journal (a crash may leave them apart: that block
then fails). J writes the blocks of the requests in flight, together, into the next
sections of the journal ring first (data sectors, then entries, each followed by a flush;
every sector ends with the section's commit id) and only then to their places, so after a
crash each block is old or new: the load replays the consistent sections as 6.1's
replay_journal does, and the kernel replays ours. Here every request is committed before
it completes (the kernel gathers writes in memory until a flush, FUA, commit_time or the
watermark). B keeps a bitmap of regions being written in the journal area (superblock
flag DIRTY_BITMAP while active); after a crash their tags are recomputed from the data
when the table is resumed, and a clean suspend or removal writes the empty journal back
and clears the flag. R reads without checking and refuses writes.

`recalculate` recomputes every tag from recalc_sector on when the table is resumed
(synchronously here, where the kernel runs a worker that leaves unchecked what it has not
reached yet), and leaves RECALCULATING set with recalc_sector at the end, as the kernel
does. Tags from an upper target (no internal_hash) and meta_device are not supported.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from minidisk.device.api import BlockSize, Caps
from minidisk.dm.integrity_format import (
    BITMAP_BLOCK_BYTES,
    DISCARD_FILLER,
    FLAG_DIRTY_BITMAP,
    FLAG_FIXED_HMAC,
    FLAG_FIXED_PADDING,
    FLAG_HAVE_JOURNAL_MAC,
    FLAG_RECALCULATING,
    MAGIC,
    MAX_LOG2_INTERLEAVE,
    MAX_TAG_SIZE,
    MAX_VERSION,
    MIN_LOG2_INTERLEAVE,
    SB_BYTES,
    SB_SECTORS,
    FormatError,
    Geometry,
    InternalHash,
    Superblock,
    bitmap_log2_sectors_per_bit,
    empty_journal,
    internal_hash,
    new_superblock,
    tags_of,
)
from minidisk.dm.integrity_journal import Journal
from minidisk.dm.integrity_options import parse_options
from minidisk.dm.status import IntegrityStatus
from minidisk.dm.status_table import IntegrityTable
from minidisk.dm.table import SECTOR
from minidisk.dm.target import DeviceRef, Target, TargetContext, TargetError, flush_device

log = logging.getLogger(__name__)

RECALC_SECTORS = 32768  # the kernel's recalculation step


class Integrity(Target):
    name = "integrity"
    version = (1, 10, 0)
    singleton = True

    def __init__(self, ctx: TargetContext, args: list[str]) -> None:
        super().__init__(ctx, args)
        if len(args) <= 4:
            raise TargetError("Invalid argument count")
        if not args[1].isdigit():
            raise TargetError("Invalid starting offset")
        self.start = int(args[1])
        self.tag_size = 0
        if args[2] != "-":
            if not args[2].isdigit() or not int(args[2]) or int(args[2]) > 2**32 - 1:
                raise TargetError("Invalid tag size")
            self.tag_size = int(args[2])
        if args[3] not in ("J", "B", "D", "R"):
            raise TargetError("Invalid mode (expecting J, B, D, R)")
        self.mode = args[3]
        self.opts = parse_options(args[4:])
        self.ref: DeviceRef = ctx.device(args[0], 0, 0)
        self.child = self.ref.device
        self.read_only = ctx.read_only or self.mode == "R"
        self._check_algorithms()
        self.mismatches = 0
        self.sb = Superblock()
        self.sb_area = bytes(SB_BYTES)
        self.geo = Geometry(self.sb, self.start, self.ref.sectors)
        self.provided = 0
        self.active = False
        self._writes = 0  # in flight
        self._started = 0  # ever begun
        self._idle = asyncio.Event()
        self._idle.set()
        self._bitmap_lock = asyncio.Lock()
        self.bitmap = bytearray()
        self.just_formatted = False
        self.failed = False  # dm_integrity_io_error: every later request fails
        self.journal = Journal(self)  # J mode's ring (a bitmap's area in B mode)
        self.caps = Caps(read_only=self.read_only, flush=True, fua=True,
                         trim=self.opts.discard and not self.read_only, zero=not self.read_only,
                         cache=True, multi_conn=self.child.caps.multi_conn,
                         rotational=self.child.caps.rotational)
        block = self.opts.sectors_per_block * SECTOR
        self.block_size = BlockSize(block, max(block, 4096))

    # The table.

    def _check_algorithms(self) -> None:
        self.hash: InternalHash | None = None
        if self.opts.hash_alg is not None:
            try:
                self.hash = internal_hash(self.opts.hash_alg, self.opts.hash_key)
            except FormatError as e:
                # crypto_alloc_shash of an unknown name fails with ENOENT
                err = errno.ENOENT if str(e) == "Invalid internal hash" else errno.EINVAL
                raise TargetError(str(e), err) from None
        if self.opts.journal_mac is not None or self.opts.journal_crypt is not None:
            raise TargetError("journal_mac and journal_crypt are not supported by "
                              "minidisk's integrity")
        if not self.tag_size:
            if self.hash is None:
                raise TargetError("Unknown tag size")
            self.tag_size = self.hash.digest_size
        if self.tag_size > MAX_TAG_SIZE:
            raise TargetError("Too big tag size")
        if self.mode == "B" and self.hash is None:
            raise TargetError("Bitmap mode can be only used with internal hash")
        if self.opts.discard and self.hash is None:
            raise TargetError("Discard can be only used with internal hash")
        if self.hash is None and self.mode != "R":
            raise TargetError("integrity without internal_hash takes its tags from an upper "
                              "target, which minidisk does not have")

    def status_table(self) -> IntegrityTable:
        flags = self.sb.flags
        opts: list[str] = []
        if self.opts.sectors_per_block != 1:
            opts.append(f"block_size:{self.opts.sectors_per_block * SECTOR}")
        if flags & FLAG_RECALCULATING:
            opts.append("recalculate")
        if self.opts.reset_recalculate:
            opts.append("reset_recalculate")
        if self.opts.discard:
            opts.append("allow_discards")
        opts.append(f"journal_sectors:{self.geo.initial_sectors - SB_SECTORS}")
        opts.append(f"interleave_sectors:{self.geo.interleave}")
        opts.append(f"buffer_sectors:{1 << self.log2_buffer_sectors}")
        if self.mode == "J":
            entries = self.geo.journal_entries
            threshold = (entries * (100 - self.opts.journal_watermark) + 50) // 100
            percent = ((entries - threshold) * 100 + entries // 2) // entries
            opts.append(f"journal_watermark:{percent}")
            opts.append(f"commit_time:{self.opts.commit_ms}")
        if self.mode == "B":
            opts.append(f"sectors_per_bit:{1 << self.log2_sectors_per_bit}")
            opts.append(f"bitmap_flush_interval:{self.opts.bitmap_flush_ms}")
        if flags & FLAG_FIXED_PADDING:
            opts.append("fix_padding")
        if flags & FLAG_FIXED_HMAC:
            opts.append("fix_hmac")
        if self.opts.legacy_recalculate:
            opts.append("legacy_recalculate")
        if self.opts.hash_alg is not None:
            key = f":{self.opts.hash_key_text}" if self.opts.hash_key_text is not None else ""
            opts.append(f"internal_hash:{self.opts.hash_alg}{key}")
        return IntegrityTable(self.ref.key, self.start, self.tag_size, self.mode, tuple(opts))

    def status_info(self) -> IntegrityStatus:
        recalc = self.sb.recalc_sector if self.sb.flags & FLAG_RECALCULATING else None
        return IntegrityStatus(self.mismatches, self.provided, recalc)

    def devices(self) -> list[DeviceRef]:
        return [self.ref]

    # Loading: read (or format) the superblock, as the kernel's constructor does.

    async def prepare(self) -> None:
        area = bytearray(SB_BYTES)
        if self.start + SB_SECTORS > self.ref.sectors:  # the kernel's read fails: EIO
            raise TargetError("Error reading superblock")
        try:
            await self.child.pread(memoryview(area), self.start * SECTOR)
        except (OSError, ValueError):
            raise TargetError("Error reading superblock") from None
        sb = Superblock.unpack(bytes(area))
        format_now = False
        if sb.magic != MAGIC:
            if self.mode != "R" and any(area):
                raise TargetError("The device is not initialized")
            sb = self._format()
            format_now = self.mode != "R"
        self._check_superblock(sb)
        geo = Geometry(sb, self.start, self.ref.sectors)
        provided = geo.provided_data_sectors()
        if not provided:
            raise TargetError("The device is too small")
        self.log2_buffer_sectors = geo.buffer_sectors_log2(self.opts.buffer_sectors)
        self.log2_sectors_per_bit = bitmap_log2_sectors_per_bit(geo, self.opts.sectors_per_bit)
        if format_now:
            sb = replace(sb, log2_blocks_per_bitmap_bit=self.log2_sectors_per_bit
                         - sb.log2_sectors_per_block)
        if self.length > provided:
            raise TargetError("Not enough provided sectors for requested mapping size")
        if self.opts.recalculate and not sb.flags & FLAG_RECALCULATING:
            sb = replace(sb, flags=sb.flags | FLAG_RECALCULATING, recalc_sector=0)
        if (sb.flags & FLAG_RECALCULATING and sb.recalc_sector < provided
                and self._recalculate_disabled(sb)):
            raise TargetError(
                'Recalculating with HMAC is disabled for security reasons - if you really '
                'need it, use the argument "legacy_recalculate"', errno.EOPNOTSUPP)
        self.sb, self.geo, self.provided = sb, geo, provided
        self.sb_area = sb.into(bytes(area))
        if format_now and self.read_only:
            raise TargetError("Error initializing journal")  # its writes fail
        if format_now:
            # init_journal, then the superblock (FUA): a crash between leaves zeroes, which
            # formats again.
            journal = empty_journal(geo, 0, geo.initial_sectors - SB_SECTORS)
            await self._write((self.start + SB_SECTORS) * SECTOR, journal)
            await self._write_sb(fua=True)
            self.just_formatted = True
        self.bitmap = bytearray(self._bitmap_blocks() * BITMAP_BLOCK_BYTES)
        if self.length % self.opts.sectors_per_block:
            # dm-table's check of the logical block size the target sets, which comes
            # after the constructor: the device is formatted, the table refused.
            raise TargetError(f"table line 0 (start sect 0 len {self.length}) not aligned "
                              f"to h/w logical block size {self.opts.sectors_per_block * SECTOR}")

    def _format(self) -> Superblock:
        try:
            sb = new_superblock(
                self.ref.sectors, self.start, self.tag_size,
                self.opts.sectors_per_block.bit_length() - 1, self.opts.journal_sectors,
                self.opts.interleave_sectors, self.opts.fix_padding,
                os.urandom(16) if self.opts.fix_hmac and self.hash is not None else None,
                self.opts.journal_mac is not None)
        except FormatError:
            raise TargetError("Could not initialize superblock") from None
        return sb.with_version(self.mode)

    def _check_superblock(self, sb: Superblock) -> None:
        if not sb.version or sb.version > MAX_VERSION:
            raise TargetError("Unknown version")
        if sb.tag_size != self.tag_size:
            raise TargetError("Tag size doesn't match the information in superblock")
        if sb.log2_sectors_per_block != self.opts.sectors_per_block.bit_length() - 1:
            raise TargetError("Block size doesn't match the information in superblock")
        if not sb.journal_sections:
            raise TargetError("Corrupted superblock, journal_sections is 0")
        if not MIN_LOG2_INTERLEAVE <= sb.log2_interleave_sectors <= MAX_LOG2_INTERLEAVE:
            raise TargetError("Invalid interleave_sectors in the superblock")
        if bool(sb.flags & FLAG_HAVE_JOURNAL_MAC) != (self.opts.journal_mac is not None):
            raise TargetError("Journal mac mismatch")

    def _recalculate_disabled(self, sb: Superblock) -> bool:
        """dm_integrity_disable_recalculate: a keyed hash is not recomputed from data an
        attacker may have written (with fix_hmac, unless a keyed journal_mac also
        protects the journal, which is not supported here)."""
        return not self.opts.legacy_recalculate and self.opts.hash_key is not None

    def _bitmap_blocks(self) -> int:
        blocks = self.provided >> self.sb.log2_sectors_per_block
        per_bit = self.log2_sectors_per_bit - self.sb.log2_sectors_per_block
        bits = (blocks + (1 << per_bit) - 1) >> per_bit
        return -(-bits // (BITMAP_BLOCK_BYTES * 8))

    # Activation and clean shutdown.

    async def resume(self) -> None:
        if self.active:
            return
        if not self.read_only:  # a read-only table writes nothing (R mode is read-only)
            await self._reread_superblock()
            await self.journal.replay()
            if self.provided != self.sb.provided_data_sectors:
                self.sb = replace(self.sb, provided_data_sectors=self.provided)
                await self._write_sb(fua=True)
            if self.sb.flags & FLAG_DIRTY_BITMAP:
                await self._recover_bitmap()
            if self.opts.reset_recalculate:
                self.sb = replace(self.sb, flags=self.sb.flags | FLAG_RECALCULATING,
                                  recalc_sector=0)
            if self.sb.flags & FLAG_RECALCULATING:
                await self._recalculate()
            if self.mode == "B":
                log2_bpb = self.log2_sectors_per_bit - self.sb.log2_sectors_per_block
                self.sb = replace(self.sb, flags=self.sb.flags | FLAG_DIRTY_BITMAP,
                                  log2_blocks_per_bitmap_bit=log2_bpb)
                await self._write_sb(fua=True)
                self.bitmap[:] = bytes(len(self.bitmap))
                await self._write_bitmap()
        self.active = True

    async def _reread_superblock(self) -> None:
        """A table loaded beside a live one (a reload) read the superblock while that one
        still had it: its clean shutdown (bitmap flag cleared, a recalculation advanced)
        is what counts at resume. The layout fields cannot have changed."""
        area = await self._read(self.start * SECTOR, SB_BYTES)
        sb = Superblock.unpack(area)
        if sb.magic != MAGIC:
            return
        if self.opts.recalculate and not sb.flags & FLAG_RECALCULATING:
            sb = replace(sb, flags=sb.flags | FLAG_RECALCULATING, recalc_sector=0)
        self.sb, self.sb_area = sb, sb.into(area)

    async def presuspend(self, noflush: bool) -> None:
        await self._shutdown()

    async def destroy(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        """dm_integrity_postsuspend: let writes finish, make data and tags durable; in
        bitmap mode write the empty journal back over the bitmap and clear the flag."""
        if not self.active:
            return
        self.active = False
        await self._idle.wait()
        if self.read_only:
            return
        await flush_device(self.child)
        if self.mode == "J" and self.journal.wrote:
            await self.journal.empty()
        if self.mode == "B":
            sectors = len(self.bitmap) // SECTOR
            await self._write((self.start + SB_SECTORS) * SECTOR,
                              empty_journal(self.geo, 0, sectors))
            self.sb = replace(self.sb, flags=self.sb.flags & ~FLAG_DIRTY_BITMAP)
            await self._write_sb(fua=True)

    async def _recover_bitmap(self) -> None:
        """After a crash in bitmap mode: the regions marked dirty get their tags from the
        data again (all of them if the bitmap's granularity changed)."""
        raw = await self._read((self.start + SB_SECTORS) * SECTOR, len(self.bitmap))
        log2_bpb = self.log2_sectors_per_bit - self.sb.log2_sectors_per_block
        per_bit = 1 << self.log2_sectors_per_bit
        if self.sb.log2_blocks_per_bitmap_bit != log2_bpb:
            await self._rehash(0, self.provided)
        else:
            for bit in range(-(-self.provided // per_bit)):
                if raw[bit >> 3] >> (bit & 7) & 1:
                    first = bit * per_bit
                    await self._rehash(first, min(per_bit, self.provided - first))
        if self.mode != "B":
            journal = empty_journal(self.geo, 0, self.geo.initial_sectors - SB_SECTORS)
            await self._write((self.start + SB_SECTORS) * SECTOR, journal)
        self.sb = replace(self.sb, flags=self.sb.flags & ~FLAG_DIRTY_BITMAP)
        await self._write_sb(fua=True)

    async def _recalculate(self) -> None:
        pos = self.sb.recalc_sector
        while pos < self.provided:
            n = min(RECALC_SECTORS, self.provided - pos,
                    self.geo.interleave - pos % self.geo.interleave)
            await self._rehash(pos, n)
            pos += n
        self.sb = replace(self.sb, recalc_sector=self.provided)
        await flush_device(self.child)
        await self._write_sb(fua=True)

    async def _rehash(self, first: int, sectors: int) -> None:
        for lsec, dsec, n in self._pieces(first, sectors):
            data = await self._read(dsec * SECTOR, n * SECTOR)
            await self._write(self.geo.tag_byte(lsec), self._tags(lsec, data))

    # I/O.

    def _pieces(self, first: int, sectors: int) -> list[tuple[int, int, int]]:
        """(logical sector, device sector, sectors) runs that stay inside an area."""
        out = []
        il = self.geo.interleave
        while sectors:
            n = min(sectors, il - first % il)
            out.append((first, self.geo.data_sector(first), n))
            first += n
            sectors -= n
        return out

    def _tags(self, lsec: int, data: bytes | memoryview) -> bytes:
        assert self.hash is not None
        salt = self.sb.salt if self.sb.flags & FLAG_FIXED_HMAC else None
        return tags_of(self.hash, self.tag_size, lsec, self.opts.sectors_per_block, data, salt)

    def _check_request(self, offset: int, length: int) -> tuple[int, int]:
        if self.failed:
            raise OSError(errno.EIO, "integrity: the device failed (see the log)")
        block = self.opts.sectors_per_block * SECTOR
        if offset % block or length % block:
            # dm_integrity_check_limits: "Bio not aligned on N sectors" (DM_MAPIO_KILL).
            raise OSError(errno.EIO, f"request not aligned on {block} bytes")
        return offset // SECTOR, length // SECTOR

    async def pread(self, buf: memoryview, offset: int) -> None:
        first, sectors = self._check_request(offset, len(buf))
        bad = False
        pos = 0
        for lsec, dsec, n in self._pieces(first, sectors):
            piece = buf[pos:pos + n * SECTOR]
            await self.child.pread(piece, dsec * SECTOR)
            pos += n * SECTOR
            if self.mode == "R" or self._unchecked(lsec, n):
                continue
            stored = await self._read(self.geo.tag_byte(lsec), self._tags_bytes(n))
            if stored != self._tags(lsec, piece) and not self._filler_ok(lsec, piece, stored):
                bad = True
        if bad:
            self.mismatches += 1
            log.error("integrity: checksum failed in sectors %#x+%#x", first, sectors)
            raise OSError(errno.EILSEQ, "integrity checksum mismatch")

    def _tags_bytes(self, sectors: int) -> int:
        return (sectors >> self.sb.log2_sectors_per_block) * self.tag_size

    def _unchecked(self, lsec: int, sectors: int) -> bool:
        """Sectors the recalculation has not reached yet are not checked."""
        return bool(self.sb.flags & FLAG_RECALCULATING) and \
            lsec + sectors > self.sb.recalc_sector

    def _filler_ok(self, lsec: int, data: memoryview, stored: bytes) -> bool:
        """With allow_discards, a tag that is all 0xf6 (a discarded block's) passes."""
        if not self.opts.discard:
            return False
        mine = self._tags(lsec, data)
        t = self.tag_size
        filler = bytes([DISCARD_FILLER]) * t
        return all(stored[i:i + t] in (mine[i:i + t], filler) for i in range(0, len(stored), t))

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        """A write or discard, counted for suspend (which waits for none to be left) and
        for the bitmap's clearing (which must see it or have begun before it)."""
        self._writes += 1
        self._started += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._writes -= 1
            if not self._writes:
                self._idle.set()

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EIO, "integrity in recovery mode refuses writes")
        first, sectors = self._check_request(offset, len(buf))
        with self._in_flight():
            if self.mode == "J":
                await self.journal.write(first, buf)
                return
            if self.mode == "B":
                await self._mark_dirty(first, sectors)
            pos = 0
            for lsec, dsec, n in self._pieces(first, sectors):
                piece = buf[pos:pos + n * SECTOR]
                await self.child.pwrite(piece, dsec * SECTOR)
                await self._write(self.geo.tag_byte(lsec), self._tags(lsec, piece))
                pos += n * SECTOR
            if fua:
                await flush_device(self.child)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        first, sectors = self._check_request(offset, length)
        with self._in_flight():
            if self.mode == "B":
                await self._mark_dirty(first, sectors)
            for lsec, dsec, n in self._pieces(first, sectors):
                filler = bytes([DISCARD_FILLER]) * self._tags_bytes(n)
                await self._write(self.geo.tag_byte(lsec), filler)
                if self.child.caps.trim:
                    await self.child.trim(dsec * SECTOR, n * SECTOR)
            if fua:
                await flush_device(self.child)

    async def flush(self) -> None:
        started, busy = self._started, self._writes
        await flush_device(self.child)
        if self.mode == "B" and self.active and any(self.bitmap):
            # What the kernel's bitmap_flush_work does on its timer: once data and tags
            # are on the disk, no region is dirty. Only if no write was in flight or began
            # since the flush started (a write counts itself before it looks at its bits,
            # and they are cleared with no wait after this test).
            async with self._bitmap_lock:
                if busy or self._writes or self._started != started:
                    return
                self.bitmap[:] = bytes(len(self.bitmap))
                await self._write_bitmap()

    async def _mark_dirty(self, first: int, sectors: int) -> None:
        """Before a write reaches the disk, its regions' bits are on the disk (FUA)."""
        lo = first >> self.log2_sectors_per_bit
        hi = (first + sectors - 1) >> self.log2_sectors_per_bit
        if all(self.bitmap[b >> 3] >> (b & 7) & 1 for b in range(lo, hi + 1)):
            return
        async with self._bitmap_lock:
            for b in range(lo, hi + 1):
                self.bitmap[b >> 3] |= 1 << (b & 7)
            await self._write_bitmap()

    async def _write_bitmap(self) -> None:
        await self._write((self.start + SB_SECTORS) * SECTOR, bytes(self.bitmap))
        await flush_device(self.child)

    async def _read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.child.pread(memoryview(buf), offset)
        return bytes(buf)

    async def _write(self, offset: int, data: bytes) -> None:
        await self.child.pwrite(memoryview(bytearray(data)), offset)

    async def _write_sb(self, fua: bool) -> None:
        self.sb = self.sb.with_version(self.mode)
        self.sb_area = self.sb.into(self.sb_area)
        await self._write(self.start * SECTOR, self.sb_area)
        if fua:
            await flush_device(self.child)
