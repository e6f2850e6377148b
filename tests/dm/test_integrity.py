"""The integrity target: first use, tags, mismatches, modes, refusals. The kernel's own
verdicts on the same format are in tests/vm/test_dm_formats.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import crc32c
import pytest
from tests.dm.dm_helpers import Server, pattern, read, run, write

from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry
from minidisk.dm.integrity_format import (
    FLAG_DIRTY_BITMAP,
    FLAG_RECALCULATING,
    Geometry,
    Superblock,
    empty_journal,
    journal_is_empty,
    xxh64,
)
from minidisk.dm.table import TableError
from minidisk.dm.targets.integrity import Integrity

SECTOR = 512
K = 4096
SIZE = 4 << 20
CRC = "- D 1 internal_hash:crc32c"


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logging.disable(logging.ERROR)  # checksum failures are logged; they are the point here
    yield
    logging.disable(logging.NOTSET)


class Disk:
    """A memory device at /dev/d under a registry, and a way to crash: a copy of its bytes
    as they are now."""

    def __init__(self, dev: MemoryDevice | None = None) -> None:
        self.dev = dev or MemoryDevice(SIZE)
        self.ns = DeviceDict({"/dev/d": self.dev})
        self.reg = Registry(self.ns, self.ns)

    async def bytes(self, offset: int = 0, length: int = SIZE) -> bytes:
        return await read(self.dev, offset, length)

    async def sb(self) -> Superblock:
        return Superblock.unpack(await self.bytes(0, K))

    async def geometry(self) -> Geometry:
        return Geometry(await self.sb(), 0, SIZE // SECTOR)

    async def crashed_copy(self) -> Disk:
        copy = MemoryDevice(SIZE)
        await write(copy, 0, await self.bytes())
        return Disk(copy)

    async def flip(self, offset: int) -> None:
        byte = await self.bytes(offset, 1)
        await write(self.dev, offset, bytes([byte[0] ^ 0x5A]))

    async def first_use(self, args: str = CRC) -> int:
        """The documented procedure: load with one sector, unload, read the superblock.
        With blocks larger than a sector the one-sector table is refused, but only after
        it formatted (as on 6.1)."""
        try:
            await self.reg.create("i", f"0 1 integrity /dev/d 0 {args}")
            await self.reg.remove("i")
        except TableError as e:
            assert "block_size:" in args and "not aligned" in e.reason
        return (await self.sb()).provided_data_sectors

    async def open(self, args: str = CRC, length: int | None = None) -> None:
        if length is None:
            length = (await self.sb()).provided_data_sectors
        await self.reg.create("i", f"0 {length} integrity /dev/d 0 {args}")

    async def failing_blocks(self, first: int, count: int, block: int = K) -> list[int]:
        dev = self.reg.get("i")
        failed = []
        for b in range(first, first + count):
            try:
                await read(dev, b * block, block)
            except OSError as e:
                assert e.errno == errno.EILSEQ
                failed.append(b)
        return failed

    def mismatches(self) -> int:
        return int(self.reg.status("i")[0][3].split()[0])


def test_first_use_formats_a_zeroed_superblock_and_provides_its_size() -> None:
    async def go() -> None:
        disk = Disk()
        provided = await disk.first_use()
        sb = await disk.sb()
        assert sb.magic == b"integrt\0" and sb.version == 1 and sb.tag_size == 4
        # 4 MiB = 8192 sectors: superblock 8, one journal section of 176, 256 tag sectors
        # (128 KiB padding), the rest data, rounded down to 8.
        assert sb.journal_sections == 1 and sb.log2_interleave_sectors == 15
        assert provided == (8192 - 8 - 176 - 256) // 8 * 8 == 7752
        await disk.open()
        assert disk.reg.status("i") == [(0, provided, "integrity", f"0 {provided} -")]
        await disk.reg.remove("i")
        with pytest.raises(TableError, match="Not enough provided sectors"):
            await disk.open(length=provided + 8)
        # Formatted: loading again neither formats nor changes the superblock.
        before = await disk.bytes(0, K)
        await disk.open()
        await disk.reg.remove("i")
        assert await disk.bytes(0, K) == before
    run(go())


def test_one_sector_with_4k_blocks_formats_and_is_refused() -> None:
    async def go() -> None:
        disk = Disk()
        with pytest.raises(TableError, match="not aligned to h/w logical block size 4096"):
            await disk.reg.create("i", "0 1 integrity /dev/d 0 - D 2 internal_hash:crc32c "
                                       "block_size:4096")
        sb = await disk.sb()
        assert sb.magic == b"integrt\0" and sb.log2_sectors_per_block == 3
        await disk.open("- D 2 internal_hash:crc32c block_size:4096", length=8)
    run(go())


def test_a_superblock_neither_valid_nor_zero_is_refused() -> None:
    async def go() -> None:
        disk = Disk()
        await write(disk.dev, 100, b"x")
        with pytest.raises(TableError, match="The device is not initialized"):
            await disk.open(length=1)
        assert (await disk.bytes(0, K))[100:101] == b"x"  # untouched
    run(go())


def test_tags_are_crc32c_of_sector_and_data_where_the_layout_says() -> None:
    """Computed here from the kernel's documentation, not from the module: areas of
    `interleave_sectors` data after their tag run, one 4-byte le crc32c per sector."""
    async def go() -> None:
        disk = Disk()
        args = "- D 2 internal_hash:crc32c interleave_sectors:64"
        await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        data = pattern(1, 256 * SECTOR)
        await write(dev, 0, data)
        initial = 8 + 176  # superblock, one journal section
        run_sectors = 256  # 64 tags * 4 bytes padded to 128 KiB
        for lsec in (0, 1, 63, 64, 130, 255):
            area, off = divmod(lsec, 64)
            dsec = initial + area * 64 + (area + 1) * run_sectors + off
            block = data[lsec * SECTOR:(lsec + 1) * SECTOR]
            assert await disk.bytes(dsec * SECTOR, SECTOR) == block
            tag_at = (initial + area * (64 + run_sectors)) * SECTOR + off * 4
            want = struct.pack("<I", crc32c.crc32c(struct.pack("<Q", lsec) + block))
            assert await disk.bytes(tag_at, 4) == want
        assert await read(dev, 0, len(data)) == data  # across the areas' boundaries
    run(go())


@pytest.mark.parametrize("args,block", [
    (CRC, SECTOR),
    ("- D 2 internal_hash:sha256 block_size:4096", K),
    ("8 B 2 internal_hash:xxhash64 sectors_per_bit:64", SECTOR),
])
def test_one_flipped_byte_fails_exactly_its_block_and_a_rewrite_repairs_it(
        args: str, block: int) -> None:
    async def go() -> None:
        disk = Disk()
        await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        data = pattern(2, 64 * block)
        await write(dev, 0, data)
        geo = await disk.geometry()
        bad = 37
        await disk.flip(geo.data_sector(bad * block // SECTOR) * SECTOR + 300 % block)
        assert await disk.failing_blocks(0, 64, block) == [bad]
        assert disk.mismatches() == 1
        assert await disk.failing_blocks(bad, 1, block) == [bad]
        assert disk.mismatches() == 2  # one per failed read, as 6.1 counts per bio
        with pytest.raises(OSError) as e:  # a read that covers it fails whole
            await read(dev, 0, len(data))
        assert e.value.errno == errno.EILSEQ and disk.mismatches() == 3
        fresh = pattern(3, block)
        await write(dev, bad * block, fresh)
        assert await read(dev, bad * block, block) == fresh
        assert await disk.failing_blocks(0, 64, block) == []
        assert disk.mismatches() == 3
    run(go())


def test_a_flipped_tag_fails_its_block_only() -> None:
    async def go() -> None:
        disk = Disk()
        await disk.first_use()
        await disk.open()
        await write(disk.reg.get("i"), 0, pattern(4, 16 * K))
        geo = await disk.geometry()
        await disk.flip(geo.tag_byte(8 * 5 + 3) + 1)  # sector 3 of 4 KiB block 5
        assert await disk.failing_blocks(0, 16) == [5]
    run(go())


def test_unwritten_blocks_fail_until_written_or_recalculated() -> None:
    """A fresh format has zero tags (integritysetup wipes; the kernel alone does not)."""
    async def go() -> None:
        disk = Disk()
        await disk.first_use()
        await disk.open()
        assert await disk.failing_blocks(0, 2) == [0, 1]
        await disk.reg.remove("i")
        await disk.open("- D 2 internal_hash:crc32c recalculate")
        provided = (await disk.sb()).provided_data_sectors
        assert await disk.failing_blocks(0, 2) == []
        assert disk.reg.status("i")[0][3] == f"0 {provided} {provided}"
        assert "recalculate" in disk.reg.table("i")[0][3]
        sb = await disk.sb()
        assert sb.flags & FLAG_RECALCULATING and sb.recalc_sector == provided
        assert sb.version == 2
    run(go())


def test_bitmap_mode_recomputes_dirty_regions_after_a_crash() -> None:
    """While active the superblock says DIRTY_BITMAP and the journal area holds a bit per
    region being written; a crash that lost a tag write in a dirty region is repaired when
    the table is loaded again. A region written and then flushed is clean: a bad tag there
    is corruption, and fails."""
    args = "- B 2 internal_hash:crc32c sectors_per_bit:64"

    async def go() -> None:
        disk = Disk()
        await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        await write(dev, 0, pattern(5, 4 * K))  # region 0 (sectors 0..63)
        await dev.flush()  # region 0 clean again
        await write(dev, 64 * SECTOR, pattern(6, 4 * K))  # region 1, dirty
        crashed = await disk.crashed_copy()
        sb = await crashed.sb()
        assert sb.flags & FLAG_DIRTY_BITMAP and sb.version == 3
        bitmap = await crashed.bytes(8 * SECTOR, 1)
        assert bitmap[0] == 0b10
        geo = await crashed.geometry()
        await crashed.flip(geo.tag_byte(64))  # as if that tag's write never happened
        await crashed.flip(geo.tag_byte(8))  # corruption in the clean region
        await crashed.open(args)
        assert await crashed.failing_blocks(0, 4) == [1]
        assert await crashed.failing_blocks(64 * SECTOR // K, 4) == []
    run(go())


def test_bitmap_mode_clean_removal_writes_the_empty_journal_back() -> None:
    args = "- B 1 internal_hash:crc32c"

    async def go() -> None:
        disk = Disk()
        await disk.first_use(args)
        await disk.open(args)
        await write(disk.reg.get("i"), 0, pattern(7, K))
        await disk.reg.remove("i")
        sb = await disk.sb()
        assert not sb.flags & FLAG_DIRTY_BITMAP and sb.version == 3
        geo = await disk.geometry()
        journal = await disk.bytes(8 * SECTOR, (geo.initial_sectors - 8) * SECTOR)
        assert journal == empty_journal(geo, 0, geo.initial_sectors - 8)
        assert journal_is_empty(geo, journal)
    run(go())


def test_recovery_mode_reads_without_checks_and_refuses_writes() -> None:
    async def go() -> None:
        disk = Disk()
        await disk.first_use()
        await disk.open()
        await write(disk.reg.get("i"), 0, pattern(8, K))
        await disk.reg.remove("i")
        geo = await disk.geometry()
        await disk.flip(geo.data_sector(2) * SECTOR)
        await disk.open("- R 1 internal_hash:crc32c")
        dev = disk.reg.get("i")
        got = await read(dev, 0, K)
        assert got != pattern(8, K) and got[:2 * SECTOR] == pattern(8, K)[:2 * SECTOR]
        with pytest.raises(OSError) as e:
            await write(dev, 0, bytes(K))
        assert e.value.errno == errno.EIO
        assert disk.mismatches() == 0
    run(go())


def test_discarded_blocks_read_with_the_filler_tag() -> None:
    args = "- D 2 internal_hash:crc32c allow_discards"

    async def go() -> None:
        disk = Disk()
        await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        assert dev.caps.trim
        await dev.trim(0, 2 * K)
        geo = await disk.geometry()
        assert await disk.bytes(geo.tag_byte(0), 16) == b"\xf6" * 16
        assert await disk.failing_blocks(0, 2) == []
    run(go())


def test_table_round_trips_with_the_kernels_argument_order() -> None:
    async def go() -> None:
        disk = Disk()
        args = ("- B 5 internal_hash:sha256 block_size:4096 fix_padding "
                "bitmap_flush_interval:1001 interleave_sectors:9000")
        await disk.first_use(args)
        await disk.open(args)
        line = disk.reg.table("i")[0][3]
        assert line == ["240:0", "0", "32", "B", "8", "block_size:4096",
                        "journal_sectors:264", "interleave_sectors:8192", "buffer_sectors:64",
                        "sectors_per_bit:32768", "bitmap_flush_interval:1004", "fix_padding",
                        "internal_hash:sha256"]
        assert (await disk.sb()).version == 4
    run(go())


@pytest.mark.parametrize("args,reason", [
    ("- D", "Invalid argument count"),
    ("- X 0", "Invalid mode (expecting J, B, D, R)"),
    ("0 D 0", "Invalid tag size"),
    ("- D 1 internal_hash:md99", "Invalid internal hash"),
    ("- D 0", "Unknown tag size"),
    ("4 B 0", "Bitmap mode can be only used with internal hash"),
    ("- D 1 block_size:1000", "Invalid block_size argument"),
    ("- D 2 internal_hash:crc32c", "Invalid number of feature args"),
    ("- D 1 internal_hash:crc32c:abc", "Invalid internal_hash argument"),
    ("- D 1 frobnicate", "Invalid argument"),
    ("600 D 1 internal_hash:crc32c", "Too big tag size"),
    ("- D 2 internal_hash:crc32c allow_discards:", "Invalid argument"),
    ("- D 1 internal_hash:hmac(sha256)", "Error setting internal hash key"),
    ("- D 1 internal_hash:crc32c:00", "Error setting internal hash key"),
])
def test_bad_tables_are_refused_with_the_kernels_reasons(args: str, reason: str) -> None:
    async def go() -> None:
        disk = Disk()
        with pytest.raises(TableError) as e:
            await disk.open(args, length=1)
        assert e.value.reason == f"integrity: {reason}"
        assert await disk.bytes(0, K) == bytes(K)  # nothing formatted
    run(go())


def test_a_superblock_beyond_the_device_is_refused() -> None:
    async def go() -> None:
        disk = Disk()
        with pytest.raises(TableError, match="Error reading superblock"):
            await disk.reg.create("i", f"0 1 integrity /dev/d {SIZE // SECTOR - 4} "
                                       "- D 1 internal_hash:crc32c")
    run(go())


def test_a_table_that_disagrees_with_the_superblock_is_refused() -> None:
    async def go() -> None:
        disk = Disk()
        await disk.first_use()
        with pytest.raises(TableError, match="Tag size doesn't match"):
            await disk.open("8 D 1 internal_hash:crc32c")
        with pytest.raises(TableError, match="Block size doesn't match"):
            await disk.open("- D 2 internal_hash:crc32c block_size:1024")
    run(go())


def test_data_survives_reload_and_suspend() -> None:
    async def go() -> None:
        disk = Disk()
        args = "- B 1 internal_hash:crc32c"
        provided = await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        await write(dev, 8 * K, pattern(9, 8 * K))
        await disk.reg.load("i", f"0 {provided} integrity /dev/d 0 {CRC}")
        await disk.reg.suspend("i")
        await disk.reg.resume("i")
        assert await read(dev, 8 * K, 8 * K) == pattern(9, 8 * K)
        assert disk.reg.table("i")[0][3][3] == "D"
    run(go())


def test_xxh64_known_values() -> None:
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


class CrashingMemory(MemoryDevice):
    """A memory device whose `limit`-th write is cut after `cut` bytes and whose writes
    fail from then on: what the disk holds when the process is killed at that moment."""

    def __init__(self, size: int, limit: int, cut: int) -> None:
        super().__init__(size)
        self.writes = 0
        self.limit = limit
        self.cut = cut

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self.writes += 1
        if self.writes == self.limit:
            await super().pwrite(buf[:min(self.cut, len(buf))], offset, fua)
        if self.writes >= self.limit:
            raise OSError(errno.EIO, "killed")
        await super().pwrite(buf, offset, fua)


JOURNAL = "- J 1 internal_hash:crc32c"


async def _journal_disk(dev: MemoryDevice) -> Disk:
    disk = Disk(dev)
    await disk.first_use(JOURNAL)
    await disk.open(JOURNAL)
    await write(disk.reg.get("i"), 0, pattern(10, 64 * K))  # the old contents
    await disk.reg.remove("i")
    return disk


def test_journal_mode_keeps_data_across_clean_reloads() -> None:
    async def go() -> None:
        disk = await _journal_disk(MemoryDevice(SIZE))
        geo = await disk.geometry()
        journal = await disk.bytes(8 * SECTOR, (geo.initial_sectors - 8) * SECTOR)
        assert journal_is_empty(geo, journal)  # a clean removal leaves nothing to replay
        await disk.open(JOURNAL)
        assert await read(disk.reg.get("i"), 0, 64 * K) == pattern(10, 64 * K)
        assert "journal_watermark:50" in disk.reg.table("i")[0][3]
        await disk.reg.remove("i")
        await disk.open(CRC)  # the kernel's D mode opens a J device left clean
        assert await read(disk.reg.get("i"), 0, 64 * K) == pattern(10, 64 * K)
    run(go())


@pytest.mark.parametrize("cut,together", [(0, False), (1536, False), (1 << 30, False),
                                         (1536, True)])
def test_journal_mode_blocks_are_old_or_new_after_a_crash_at_any_write(
        cut: int, together: bool) -> None:
    """Killed at every write of a run of journal-mode writes (the write cut after `cut`
    bytes, as a killed process leaves it; `together`: all requests in flight at once, so
    they are committed as one group): loaded again, every block reads, and reads as it was
    before the run or as it was written, never torn. D mode fails this."""
    new = pattern(11, 64 * K)

    async def writes(disk: Disk) -> None:
        dev = disk.reg.get("i")
        offsets = range(0, 64 * K, 12 * K)  # requests of 3 blocks across sections
        if together:
            await asyncio.gather(*(write(dev, n, new[n:n + 12 * K]) for n in offsets))
            return
        for n in offsets:
            await write(dev, n, new[n:n + 12 * K])

    async def go() -> None:
        base = await _journal_disk(MemoryDevice(SIZE))
        image = await base.bytes()
        probe = Disk(CrashingMemory(SIZE, 1 << 30, 0))
        await write(probe.dev, 0, image)
        assert isinstance(probe.dev, CrashingMemory)
        probe.dev.writes = 0
        await probe.open(JOURNAL)
        await writes(probe)
        total = probe.dev.writes
        assert total > 10
        old = pattern(10, 64 * K)
        for limit in range(1, total + 1):
            dev = CrashingMemory(SIZE, 1 << 30, 0)
            await write(dev, 0, image)
            dev.writes, dev.limit, dev.cut = 0, limit, cut
            disk = Disk(dev)
            await disk.open(JOURNAL)
            try:
                await writes(disk)
            except OSError:
                pass
            after = await disk.crashed_copy()
            await after.open(JOURNAL)
            got = await read(after.reg.get("i"), 0, 64 * K)
            for b in range(64 * K // K):
                block = got[b * K:(b + 1) * K]
                assert block in (old[b * K:(b + 1) * K], new[b * K:(b + 1) * K]), (
                    f"crash at write {limit}/{total}: block {b} is torn")
    run(go())


def test_recalculate_after_a_table_change_of_hash() -> None:
    """Tags made with crc32c fail under xxhash64 (truncated to the same 4 bytes) until a
    reload with reset_recalculate computes them again from the data; `recalculate` alone
    does not restart a recalculation the superblock says is done."""
    async def go() -> None:
        disk = Disk()
        await disk.first_use("4 D 2 internal_hash:crc32c recalculate")
        await disk.open("4 D 2 internal_hash:crc32c recalculate")
        await write(disk.reg.get("i"), 0, pattern(12, 8 * K))
        await disk.reg.remove("i")
        await disk.open("4 D 2 internal_hash:xxhash64 recalculate")
        assert await disk.failing_blocks(0, 8) == list(range(8))
        await disk.reg.remove("i")
        await disk.open("4 D 2 internal_hash:xxhash64 reset_recalculate")
        assert await disk.failing_blocks(0, 8) == []
        assert await read(disk.reg.get("i"), 0, 8 * K) == pattern(12, 8 * K)
    run(go())


def test_a_bitmap_reload_does_not_take_the_old_tables_dirty_flag_for_a_crash() -> None:
    """The new table read the superblock while the old one had DIRTY_BITMAP set; by its
    resume the old one has shut down cleanly, so nothing is recomputed: a tag corrupted
    meanwhile still fails."""
    args = "- B 2 internal_hash:crc32c sectors_per_bit:64"

    async def go() -> None:
        disk = Disk()
        provided = await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        # Region 32 (sector 2048): its bit's byte in the empty journal the old table
        # writes back is 0xff (an unused entry's sector_hi).
        await write(dev, 2048 * SECTOR, pattern(13, 4 * K))
        await dev.flush()
        await disk.reg.load("i", f"0 {provided} integrity /dev/d 0 {args}")
        geo = await disk.geometry()
        await disk.flip(geo.tag_byte(2048))
        await disk.reg.suspend("i")
        await disk.reg.resume("i")
        assert await disk.failing_blocks(2048 * SECTOR // K, 4) == [2048 * SECTOR // K]
        assert (await disk.sb()).flags & FLAG_DIRTY_BITMAP
    run(go())


def test_hmac_with_fix_hmac_salts_the_tags() -> None:
    args = "- D 2 internal_hash:hmac(sha256):00112233 fix_hmac"

    async def go() -> None:
        disk = Disk()
        await disk.first_use(args)
        sb = await disk.sb()
        assert sb.version == 5 and sb.tag_size == 32 and sb.salt != bytes(16)
        await disk.open(args)
        dev = disk.reg.get("i")
        await write(dev, 0, pattern(14, K))
        assert await read(dev, 0, K) == pattern(14, K)
        assert disk.reg.table("i")[0][3][-2:] == ["fix_hmac",
                                                  "internal_hash:hmac(sha256):00112233"]
        await disk.reg.remove("i")
        # Another key: the table loads, and the blocks fail.
        await disk.open("- D 2 internal_hash:hmac(sha256):00112234 fix_hmac")
        assert await disk.failing_blocks(0, 1) == [0]
    run(go())


def test_recalculating_a_keyed_hash_needs_fix_hmac_or_legacy_recalculate() -> None:
    async def go() -> None:
        disk = Disk()
        args = "- D 1 internal_hash:hmac(sha256):0011"
        await disk.first_use(args)
        with pytest.raises(TableError, match="Recalculating with HMAC is disabled") as e:
            await disk.open("- D 2 internal_hash:hmac(sha256):0011 recalculate")
        assert e.value.errno == errno.EOPNOTSUPP
        await disk.open("- D 3 internal_hash:hmac(sha256):0011 recalculate legacy_recalculate")
        assert await disk.failing_blocks(0, 1) == []
    run(go())


@pytest.mark.slow
def test_a_corrupted_block_is_eio_over_nbd(tmp_path: Path,
                                           serve: Callable[..., Server]) -> None:
    """The documented first use with `minidisk dmsetup`, writes and reads with qemu-io over
    NBD, one byte flipped in the host file: that block's read is EIO on the wire, its
    neighbours read, the status counts one mismatch."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    server = serve(f"--file=/dev/disk={image}")
    server.dmsetup("create", "i", "--table", "0 1 integrity /dev/disk 0 - D 1 "
                   "internal_hash:crc32c")
    server.dmsetup("remove", "i")
    sb = Superblock.unpack(image.read_bytes()[:K])
    provided = sb.provided_data_sectors
    server.dmsetup("create", "i", "--table", f"0 {provided} integrity /dev/disk 0 {CRC}")
    uri = server.uri("/dev/mapper/i")
    qemu = ["qemu-io", "-f", "raw"]
    subprocess.run([*qemu, "-c", "write -P 0x5a 0 64k", uri], check=True, capture_output=True,
                   timeout=60)
    at = Geometry(sb, 0, SIZE // SECTOR).data_sector(40) * SECTOR + 7  # in 4 KiB block 5
    with image.open("r+b") as f:
        f.seek(at)
        f.write(b"\xa5")
    bad = subprocess.run([*qemu, "-c", "read 20480 4096", uri], capture_output=True,
                         text=True, timeout=60)
    assert "read failed: Input/output error" in bad.stdout + bad.stderr
    good = subprocess.run([*qemu, "-c", "read -P 0x5a 16384 4096", "-c",
                           "read -P 0x5a 24576 4096", uri], capture_output=True, text=True,
                          timeout=60)
    assert good.stdout.count("read 4096/4096") == 2, good.stdout + good.stderr
    status = server.dmsetup("status", "i").stdout.split()
    assert status[3:] == ["1", str(provided), "-"]


def test_journal_mode_commits_requests_in_flight_together_in_their_order() -> None:
    args = "- J 2 internal_hash:crc32c journal_sectors:600"  # 3 sections

    async def go() -> None:
        disk = Disk()
        await disk.first_use(args)
        await disk.open(args)
        dev = disk.reg.get("i")
        target = disk.reg.get("i").live.targets[0]
        assert isinstance(target, Integrity)
        before = (target.journal.commit_seq, target.journal.free_section)
        blocks = [pattern(20 + b, K) for b in range(16)]
        last = pattern(99, K)
        await asyncio.gather(*(write(dev, b * K, blocks[b]) for b in range(16)),
                             write(dev, 3 * K, last))  # queued after block 3's first write
        # 17 requests of 8 entries: one group of 136 entries, one 168-entry section.
        journal = target.journal
        assert (journal.commit_seq, journal.free_section) == (before[0], before[1] + 1)
        blocks[3] = last
        assert await read(dev, 0, 16 * K) == b"".join(blocks)
        await disk.reg.remove("i")
        await disk.open(args)
        assert await read(disk.reg.get("i"), 0, 16 * K) == b"".join(blocks)
    run(go())
