"""dm-crypt's part of the format oracle (test_dm_formats.py, guest/dm_formats_crypt.sh).

Every cipher and IV mode minidisk has is one segment of one table (CASES): segment k maps
SPAN sectors at sector k*SPAN of a backing file, so one device, one dd and one table listing
cover them all in the guest. The host (`prepare`, before the boot) writes data.bin through
minidisk's table into ours.img; the guest then reads ours.img through 6.1's dm-crypt with
the same table (OUTPUT/ours.read), writes data.bin through it into a fresh file
(OUTPUT/kernel.img), reads ours.img with every key's first byte flipped (OUTPUT/wrong.read),
lists the tables with --showkeys, and runs the key messages (live, suspended, wiped, set)
on the first segment. After the boot the host reads kernel.img through minidisk and compares
every file, row and table.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path

from minidisk.device.file import FileDevice
from minidisk.dm import DeviceDict, Registry
from minidisk.dm.table import TableError

SECTOR = 512
SPAN = 32  # sectors of each case: 16 KiB, a multiple of every case's sector size
DEVICE_KEY = "/dev/img"


@dataclass(frozen=True)
class Case:
    name: str
    cipher: str
    key_bytes: int
    iv_offset: int
    options: str = ""

    def key(self, wrong: bool = False) -> str:
        key = bytearray(random.Random(self.name).randbytes(self.key_bytes))
        if wrong:
            key[0] ^= 0xFF
        return key.hex()


CASES = (
    Case("xts-plain64", "aes-xts-plain64", 64, 0),
    Case("xts-plain64-aes128", "aes-xts-plain64", 32, 7),
    Case("xts-plain-wraps", "aes-xts-plain", 64, 2**32 - 16),  # the 32-bit IV wraps at 16
    Case("cbc-essiv", "aes-cbc-essiv:sha256", 32, 0),
    Case("cbc-essiv-aes128", "aes-cbc-essiv:sha256", 16, 100),
    Case("cbc-plain-wraps", "aes-cbc-plain", 16, 2**32 - 10),
    Case("cbc-plain64-aes192", "aes-cbc-plain64", 24, 2**40),
    Case("xts-4k", "aes-xts-plain64", 64, 16, "1 sector_size:4096"),
    Case("xts-4k-large", "aes-xts-plain64", 64, 16, "2 sector_size:4096 iv_large_sectors"),
    Case("capi-xts", "capi:xts(aes)-plain64", 64, 0,
         "3 allow_discards same_cpu_crypt submit_from_crypt_cpus"),
    Case("capi-cbc-essiv", "capi:cbc(aes)-essiv:sha256", 32, 0,
         "2 no_read_workqueue no_write_workqueue"),
    Case("cbc-plain64be", "aes-cbc-plain64be", 32, 3),
    Case("cbc-null", "aes-cbc-null", 32, 0),
    Case("ecb", "aes-ecb", 16, 0),
    Case("xts-essiv", "aes-xts-essiv:sha256", 64, 0),
    Case("cbc-essiv-1k", "aes-cbc-essiv:sha256", 32, 8, "1 sector_size:1024"),
    Case("cbc-essiv-md5", "aes-cbc-essiv:md5", 16, 0),
    Case("cbc-benbi", "aes-cbc-benbi", 32, 5),
    Case("cbc-eboiv", "aes-cbc-eboiv", 32, 3),
    Case("cbc-eboiv-4k", "aes-cbc-eboiv", 16, 16, "1 sector_size:4096"),
    Case("old-default-cbc-plain", "aes", 16, 2**32 - 4),  # the original format: cbc-plain
)
SIZE = len(CASES) * SPAN * SECTOR
# The key messages, as the fragment sends them to the first segment of `ours`: (what, args)
MESSAGES = (
    ("message", "key wipe"),  # live: refused
    ("message", f"key set {CASES[0].key()}"),  # live: refused
    ("suspend", ""),
    ("message", "key wipe"),
    ("resume", ""),  # no key: EAGAIN, still suspended
    ("table", ""),
    ("message", f"key set {CASES[0].key()}"),
    ("resume", ""),
    ("table", ""),
)


def table(device: str, wrong: bool = False) -> str:
    return "".join(
        f"{k * SPAN} {SPAN} crypt {c.cipher} {c.key(wrong)} {c.iv_offset} {device} "
        f"{k * SPAN} {c.options}".rstrip() + "\n"
        for k, c in enumerate(CASES))


def data() -> bytes:
    return random.Random("dm_formats_crypt").randbytes(SIZE)


class Side:
    """minidisk's crypt devices over one image file, as the fragment names them."""

    def __init__(self, image: Path, read_only: bool) -> None:
        self.file = FileDevice(str(image), read_only=read_only)
        ns = DeviceDict({DEVICE_KEY: self.file})
        self.reg = Registry(ns, ns)

    async def create(self, name: str, wrong: bool = False) -> None:
        await self.reg.create(name, table(DEVICE_KEY, wrong), read_only=self.file.caps.read_only)

    async def read(self, name: str) -> bytes:
        buf = bytearray(SIZE)
        await self.reg.get(name).pread(memoryview(buf), 0)
        return bytes(buf)

    async def write(self, name: str, payload: bytes) -> None:
        await self.reg.get(name).pwrite(memoryview(bytearray(payload)), 0)
        await self.reg.get(name).flush()

    def tables(self, name: str) -> list[str]:
        """`dmsetup table --showkeys` lines, the device field as DEV."""
        return [normalize(f"{s} {n} {t} {' '.join(args)}")
                for s, n, t, args in self.reg.table(name)]

    async def messages(self, name: str) -> list[str]:
        """MESSAGES on `name`: one row each (the exit status, or the table's first line)."""
        rows = []
        for what, args in MESSAGES:
            rc = 0
            try:
                if what == "message":
                    await self.reg.message(name, 0, args.split())
                elif what == "suspend":
                    await self.reg.suspend(name)
                elif what == "resume":
                    await self.reg.resume(name)
                else:
                    rows.append(self.tables(name)[0])
                    continue
            except (OSError, TableError):
                rc = 1
            rows.append(f"{what} {args}: {rc}")
        return rows

    async def close(self) -> None:
        for name in self.reg.names():
            await self.reg.remove(name)
        await self.file.close()


def normalize(line: str) -> str:
    """A table line with its device field (MAJOR:MINOR, which differs) as DEV."""
    words = line.split()
    words[6] = "DEV"
    return " ".join(words)


def message_rows(text: str) -> list[str]:
    """The fragment's messages output (an exit status or a table line per operation) as
    Side.messages' rows."""
    return [normalize(line) if what == "table" else f"{what} {args}: {line.strip()}"
            for line, (what, args) in zip(text.splitlines(), MESSAGES, strict=True)]


async def _prepare(directory: Path) -> None:
    payload = data()
    image = directory / "ours.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    side = Side(image, read_only=False)
    try:
        await side.create("ours")
        await side.write("ours", payload)
    finally:
        await side.close()


def prepare(directory: Path) -> None:
    """Lay out the fragment's input: data.bin, ours.img (data.bin through minidisk's table)
    and the three tables with DEV for the loop device."""
    directory.mkdir(parents=True)
    (directory / "data.bin").write_bytes(data())
    (directory / "ours.table").write_text(table("DEV"))
    (directory / "wrong.table").write_text(table("DEV", wrong=True))
    (directory / "messages").write_text("".join(f"{w} {a}".rstrip() + "\n"
                                                for w, a in MESSAGES))
    asyncio.run(_prepare(directory))


async def host_reads(image: Path) -> tuple[bytes, bytes, list[str], list[str]]:
    """`image` through minidisk's table and with the wrong keys, the tables, and the
    message rows (run on a table over `image`)."""
    side = Side(image, read_only=True)
    try:
        await side.create("ours")
        await side.create("wrong", wrong=True)
        ours, wrong = await side.read("ours"), await side.read("wrong")
        tables = side.tables("ours")
        rows = await side.messages("ours")
    finally:
        await side.close()
    return ours, wrong, tables, rows
