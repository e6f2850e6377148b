"""dm-integrity's part of the format oracle (test_dm_formats.py, guest/dm_formats_integrity.sh).

For each configuration (mode, hash, tag and block size, interleave, padding) both sides
start from a zeroed 2 MiB file and follow the kernel's first-use procedure: load the table
with one sector (it formats), unload, read provided_data_sectors from the superblock, load
it with that length; then write the same data at the start and at the end (4 KiB O_DIRECT
writes) and unload. minidisk does it here (`prepare`, before the boot) and leaves its file
for the guest; the kernel does it there. The guest then opens minidisk's file with the same
table and with `integritysetup open`, dumps both superblocks with `integritysetup dump`, and
reads minidisk's file again with one data byte flipped, block by block. After the boot
minidisk opens the kernel's file (`read_file`), flipped the same way (`flipped_blocks`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.vm.dm_refusals import try_table

from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry
from minidisk.dm.integrity_format import (
    SB_SECTORS,
    Geometry,
    JournalEntry,
    Superblock,
    internal_hash,
    plan_replay,
    section_image,
    tag_of,
)
from minidisk.dm.table import TableError

SECTOR = 512
K = 4096
IMAGE_SIZE = 2 << 20
HALF = 128 << 10  # each of the two written regions
FLIP_SECTOR = 17  # the logical sector whose data gets a flipped byte (in 4 KiB block 2)
FLIP_BYTE = 100


@dataclass(frozen=True)
class Config:
    name: str
    tag: str  # the table's tag size, "-" for the hash's
    mode: str
    opts: tuple[str, ...]
    open_args: str  # integritysetup open's options for the same device

    def table(self, dev: str, length: int) -> str:
        return (f"0 {length} integrity {dev} 0 {self.tag} {self.mode} {len(self.opts)} "
                + " ".join(self.opts))


CONFIGS = (
    # First: its kernel-formatted file is the refusals' DEV (crc32c, 512-byte blocks).
    Config("j512", "-", "J", ("internal_hash:crc32c", "journal_sectors:600"),
           "--integrity crc32c"),
    Config("b4k", "-", "B", ("internal_hash:sha256", "block_size:4096",
                             "interleave_sectors:8192", "fix_padding"),
           "--integrity sha256 --integrity-bitmap-mode"),
    Config("x64", "8", "D", ("internal_hash:xxhash64", "interleave_sectors:1024",
                             "journal_sectors:400"),
           "--integrity xxhash64 --integrity-no-journal"),
)
JOURNALED = "j512"  # also gets NAME.crash.img: its journal holds a section not written back
CRASH_BLOCKS = 8  # the first 4 KiB blocks, new in that section

# Tables the kernel refuses (DEV: a device formatted with crc32c tags on 512-byte blocks,
# BAD: one whose superblock is neither valid nor zero), each "LENGTH TABLE-ARGS".
REFUSALS = (
    "8 integrity DEV 0 - D",
    "8 integrity DEV 0 - X 0",
    "8 integrity DEV 0 - D 1 internal_hash:nosuch",
    "8 integrity DEV 0 4 B 0",
    "8 integrity DEV 0 - D 2 internal_hash:crc32c",
    "8 integrity BAD 0 - D 1 internal_hash:crc32c",
    "8 integrity DEV 0 8 D 1 internal_hash:crc32c",
    "99999 integrity DEV 0 - D 1 internal_hash:crc32c",
    "8 integrity DEV 0 - D 1 bogus",
    "8 integrity DEV 0 - D 2 internal_hash:crc32c block_size:4096",
)
# Written to the kernel log before each refusal (not snapshot's "dm_formats refusal N").
REFUSAL_MARK = "dm_formats integrity refusal "


def data() -> bytes:
    return random.Random(14).randbytes(2 * HALF)


def crash_data() -> bytes:
    return random.Random(15).randbytes(CRASH_BLOCKS * K)


def crashed(config: Config, image: Path, crash: Path) -> None:
    """`image` as a J-mode write of CRASH_BLOCKS blocks leaves it when the process is
    killed after the journal section went to the disk and before the blocks went to their
    places: the section our target writes next (the ring's position as replay finds it)."""
    raw = bytearray(image.read_bytes())
    sb = Superblock.unpack(bytes(raw[:K]))
    geo = Geometry(sb, 0, len(raw) // SECTOR)
    start = SB_SECTORS * SECTOR
    journal = bytes(raw[start:geo.initial_sectors * SECTOR])
    plan = plan_replay(geo, journal, config.mode)
    assert not plan.replay and not plan.clear, "a clean journal continues where it was"
    block = crash_data()
    hash_ = internal_hash("crc32c", None)
    entries = [JournalEntry(8 * b, block[b * K:(b + 1) * K],
                            b"".join(tag_of(hash_, sb.tag_size, 8 * b + s,
                                            block[b * K + s * SECTOR:b * K + (s + 1) * SECTOR])
                                     for s in range(8)))
               for b in range(CRASH_BLOCKS)]
    # 512-byte blocks: each 4 KiB block is 8 entries.
    entries = [JournalEntry(e.sector + s, e.data[s * SECTOR:(s + 1) * SECTOR],
                            e.tag[s * sb.tag_size:(s + 1) * sb.tag_size])
               for e in entries for s in range(8)]
    section = plan.continue_section
    at = start + section * geo.section_sectors * SECTOR
    image_bytes = section_image(geo, section, plan.commit_seq, entries[:geo.section_entries])
    raw[at:at + len(image_bytes)] = image_bytes
    crash.write_bytes(bytes(raw))


def superblock(path: Path) -> Superblock:
    with path.open("rb") as f:
        return Superblock.unpack(f.read(K))


def flip_offset(path: Path) -> int:
    """Byte of the image inside FLIP_SECTOR's data."""
    sb = superblock(path)
    geo = Geometry(sb, 0, path.stat().st_size // SECTOR)
    return geo.data_sector(FLIP_SECTOR) * SECTOR + FLIP_BYTE


def flip(path: Path) -> None:
    offset = flip_offset(path)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


class Side:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.file = FileDevice(str(path), read_only=read_only)
        self.ns = DeviceDict({"/dev/disk": self.file})
        self.reg = Registry(self.ns, self.ns)

    async def close(self) -> None:
        for name in self.reg.names():
            await self.reg.remove(name)
        await self.file.close()


async def first_use(config: Config, path: Path) -> tuple[int, int]:
    """The kernel's procedure on minidisk: the one-sector load's status (refused with
    blocks of more than a sector, after formatting, as 6.1 does), provided_data_sectors."""
    side = Side(path)
    rc = 0
    try:
        await side.reg.create("i", config.table("/dev/disk", 1))
    except TableError:
        rc = 1
    finally:
        await side.close()
    return rc, superblock(path).provided_data_sectors


async def write_regions(config: Config, path: Path, provided: int, source: bytes) -> None:
    side = Side(path)
    try:
        await side.reg.create("i", config.table("/dev/disk", provided))
        dev = side.reg.get("i")
        for base, chunk in ((0, source[:HALF]), (provided * SECTOR - HALF, source[HALF:])):
            for pos in range(0, HALF, K):
                await dev.pwrite(memoryview(bytearray(chunk[pos:pos + K])), base + pos)
    finally:
        await side.close()


async def read_file(config: Config, path: Path,
                    writable: bool = False) -> tuple[str, bytes, str]:
    """(status, the two written regions read back, table) of an image opened read-only
    (`writable`: read-write, so that a journal can be replayed)."""
    side = Side(path, read_only=not writable)
    provided = superblock(path).provided_data_sectors
    try:
        await side.reg.create("i", config.table("/dev/disk", provided),
                              read_only=not writable)
        dev = side.reg.get("i")
        out = bytearray()
        for base in (0, provided * SECTOR - HALF):
            buf = bytearray(HALF)
            await dev.pread(memoryview(buf), base)
            out += buf
        status = side.reg.status("i")[0][3]
        table = " ".join(side.reg.table("i")[0][3])
        return status, bytes(out), table
    finally:
        await side.close()


async def flipped_blocks(config: Config, path: Path) -> tuple[list[int], list[int], str]:
    """Reading the first region of an image, flipped, one 4 KiB request at a time: the
    blocks that failed, their errnos, and the status afterwards."""
    side = Side(path, read_only=True)
    provided = superblock(path).provided_data_sectors
    failed, errnos = [], []
    logging.disable(logging.ERROR)  # the checksum failures are expected
    try:
        await side.reg.create("i", config.table("/dev/disk", provided), read_only=True)
        dev = side.reg.get("i")
        for block in range(HALF // K):
            try:
                await dev.pread(memoryview(bytearray(K)), block * K)
            except OSError as e:
                failed.append(block)
                errnos.append(e.errno or 0)
        return failed, errnos, side.reg.status("i")[0][3]
    finally:
        logging.disable(logging.NOTSET)
        await side.close()


def libraries(program: str) -> list[str]:
    """What `ldd` says `program` loads (paths only): the guest copies them to its tmpfs."""
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    return [words[2] for words in (line.split() for line in out.splitlines())
            if len(words) > 2 and words[1] == "=>"]


def prepare(directory: Path) -> dict[str, dict[str, object]]:
    """The fragment's input: data.bin, configs (NAME TAG MODE N OPTS... per line), opens,
    refusals, o/NAME.img (minidisk's files; o/NAME.crash.img for journal mode) and
    f/NAME.img (flipped). Returns, per configuration, what minidisk saw."""
    (directory / "o").mkdir(parents=True)
    (directory / "f").mkdir()
    source = data()
    (directory / "data.bin").write_bytes(source)
    (directory / "refusals").write_text("".join(t + "\n" for t in REFUSALS))
    (directory / "libs").write_text(" ".join(libraries("/sbin/integritysetup")) + "\n")
    lines, opens = [], []
    results: dict[str, dict[str, object]] = {}
    for config in CONFIGS:
        lines.append(f"{config.name} {config.tag} {config.mode} {len(config.opts)} "
                     + " ".join(config.opts))
        opens.append(f"{config.name} {config.open_args}")
        image = directory / "o" / f"{config.name}.img"
        with image.open("wb") as f:
            f.truncate(IMAGE_SIZE)
        rc, provided = asyncio.run(first_use(config, image))
        asyncio.run(write_regions(config, image, provided, source))
        flipped = directory / "f" / f"{config.name}.img"
        shutil.copy(image, flipped)
        flip(flipped)
        replayed = b""
        if config.name == JOURNALED:
            crash = directory / "o" / f"{config.name}.crash.img"
            crashed(config, image, crash)
            copy = directory.parent / f"integrity-{config.name}-crash.img"
            shutil.copy(crash, copy)
            replayed = asyncio.run(read_file(config, copy, writable=True))[1]
        status, regions, table = asyncio.run(read_file(config, image))
        results[config.name] = {
            "create1.rc": rc, "provided": provided, "status": status, "table": table,
            "regions": regions, "flipped": asyncio.run(flipped_blocks(config, flipped)),
            "replayed": replayed}
    (directory / "configs").write_text("".join(line + "\n" for line in lines))
    (directory / "opens").write_text("".join(line + "\n" for line in opens))
    return results


def parse_dump(text: str) -> dict[str, str]:
    """`integritysetup dump`'s lines as field -> value (the device line left out)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("Info for"):
            continue
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def dump_of(sb: Superblock) -> dict[str, str]:
    """What `integritysetup dump` prints for superblock `sb` (the fields it has)."""
    flags = [name for bit, name in ((0x1, "journal_mac"), (0x2, "recalculate"),
                                    (0x4, "dirty_bitmap"), (0x8, "fix_padding"),
                                    (0x10, "fix_hmac")) if sb.flags & bit]
    return {
        "superblock_version": str(sb.version),
        "log2_interleave_sectors": str(sb.log2_interleave_sectors),
        "integrity_tag_size": str(sb.tag_size),
        "journal_sections": str(sb.journal_sections),
        "provided_data_sectors": str(sb.provided_data_sectors),
        "sector_size": str(SECTOR << sb.log2_sectors_per_block),
        "log2_blocks_per_bitmap": str(sb.log2_blocks_per_bitmap_bit),
        "flags": " ".join(flags),
    }


async def refusal(line: str) -> tuple[int, str, str]:
    """(rc, reason as 6.1 logs it, table) of one of REFUSALS on minidisk."""
    good, bad = MemoryDevice(IMAGE_SIZE), MemoryDevice(IMAGE_SIZE)
    await bad.pwrite(memoryview(bytearray(data())), 0)  # the guest's BAD is data.bin
    devices: dict[str, BlockDevice] = {"/dev/dev": good, "/dev/bad": bad}
    ns = DeviceDict(devices)
    reg = Registry(ns, ns)
    await reg.create("fmt", CONFIGS[0].table("/dev/dev", 1))
    await reg.remove("fmt")
    length, _, args = line.partition(" ")
    text = args.replace("DEV", "/dev/dev").replace("BAD", "/dev/bad")
    return await try_table(reg, f"0 {length} {text}", 1)
