"""dm-snapshot's part of the format oracle (test_dm_formats.py, guest/dm_formats_snapshot.sh).

A scenario is an origin with several snapshots (their stores P, PO, N, chunk sizes from 512
bytes to the default) and a list of operations, run twice from the same initial files: by
minidisk on the host (`prepare`, before the boot) and by 6.1's dm-snapshot in the guest.
Both leave the same rows (dmsetup status and table of every device, exit statuses, every
device's contents) and end with files that must be identical; the kernel then opens
minidisk's files, and after the boot minidisk opens the kernel's (`open_files`). The
operations are the fragment's (its header lists them); writes are O_DIRECT, one request of
BS bytes at a time, in order, so both sides allocate the same chunks in the same order.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.vm.dm_refusals import try_table

from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry
from minidisk.dm.targets.snapshot import SnapshotMerge

SECTOR = 512
K = 4096  # the scenarios' unit of writing
ORIGIN_SIZE = 256 << 10
DATA_SIZE = 256 << 10
DUMP_STEP = 64 << 10  # the fragment's dd bs=64k


def w(dev: str, offset: int, length: int, bs: int, data: int) -> str:
    return f"w {dev} {offset} {length} {bs} {data}"


@dataclass(frozen=True)
class Snap:
    store: str  # "P", "PO", "N"
    chunk: int  # the table's chunk size (0: the default)
    cow_size: int
    reload_chunk: int | None = None  # the chunk size a reload's table gives


@dataclass(frozen=True)
class Scenario:
    name: str
    snaps: tuple[Snap, ...]
    ops: tuple[str, ...]

    def places(self) -> list[tuple[int, int]]:
        """(start, sectors) in disk.img of the origin, then of each COW device."""
        out = [(0, ORIGIN_SIZE // SECTOR)]
        for snap in self.snaps:
            out.append((out[-1][0] + out[-1][1], snap.cow_size // SECTOR))
        return out

    def spec(self) -> str:
        places = self.places()
        lines = [f"origin - - - 0 {places[0][1]}"]
        lines += [f"s{i} {s.store} {s.chunk} {s.reload_chunk or s.chunk} {start} {length}"
                  for i, (s, (start, length)) in enumerate(zip(self.snaps, places[1:],
                                                               strict=True))]
        return "".join(line + "\n" for line in lines)


SCENARIOS = (
    # Every origin write copies out to every snapshot: 4 KiB, 512-byte (its areas of 32
    # exceptions fill) and 16 KiB (the default) chunks, persistent and transient.
    Scenario("multi", (Snap("P", 8, 256 << 10, 16), Snap("N", 8, 128 << 10),
                       Snap("P", 1, 128 << 10), Snap("P", 0, 256 << 10)), (
        "status",
        # The origin was resumed before its snapshots were loaded: it splits writes at no
        # boundary, so a 4 KiB write copies out one 512-byte chunk of s2 (as 6.1 does).
        w("o", 0, 2 * K, K, 0),
        "cycle",  # suspend and resume the origin (as LVM does): now it splits at 512
        w("o", 2 * K, 2 * K, K, 4096),  # copy-outs of every chunk to every snapshot
        w("o", 3 * K, 1024, 512, 8192),  # part of a chunk, 512 bytes a write
        w("s0", 10 * K, K, K, 16384),  # a whole chunk of s0: written, not copied
        w("s0", 13 * K + 512, 1536, 512, 20480),  # part of one: the origin's copied first
        w("s1", 10 * K, K, K, 16384),
        w("s2", 16 * K, K, 512, 24576),  # eight whole 512-byte chunks
        w("s3", 20 * K, 2048, 512, 28672),  # part of a 16 KiB chunk
        w("o", 10 * K, K, K, 32768),  # s0 and s1 have chunk 10: only s2, s3 copy
        w("o", 63 * K, K, K, 36864),  # the last chunk
        "status",
        "reload",  # s0's table says 16 sectors: its store's 8 win
        "status", "table",
        w("o", 6 * K, 4 * K, K, 40960),
        "status", "dump",
        # LVM's merge of s0 into the origin, while s1-s3 stay: they get their copies of the
        # chunks it changes first.
        "lvmmerge s0", w("o", 30 * K, K, K, 45056), "status", "dump")),
    # Full stores: a PO snapshot written to overflows (its writes fail, reads go on); a P
    # one is invalidated; origin writes invalidate whatever cannot take their copy, PO or
    # not, overflowed or not.
    Scenario("fill", (Snap("PO", 8, 48 << 10), Snap("P", 8, 48 << 10),
                      Snap("PO", 8, 48 << 10)), (
        w("s0", 0, 10 * K, K, 0),  # ten exceptions: header, area, ten chunks = 48 KiB
        "status",
        w("s0", 10 * K, K, K, 0),
        w("s1", 0, 10 * K, K, 4096),
        w("s1", 10 * K, K, K, 0),
        "status", "dump",
        "handover s0", "status",  # the new table keeps the old one's Overflow
        w("o", 20 * K, K, K, 8192),
        "status",
        w("o", 21 * K, 9 * K, K, 12288),
        "status",
        w("o", 30 * K, K, K, 16384),
        "status", "reload", "status")),  # (host.* reads them: the store's end state)
    # snapshot-merge of s0 while s1 stays: merged chunks are copied out to s1 first.
    Scenario("merge", (Snap("P", 8, 256 << 10), Snap("P", 8, 256 << 10)), (
        w("o", 0, 4 * K, K, 0),  # four consecutive exceptions: one merge step
        w("s0", 5 * K, K, K, 16384),
        w("s0", 8 * K, 512, 512, 20480),
        w("o", 25 * K, K, K, 24576),
        w("s1", 5 * K, K, K, 32768),
        "status", "dump",
        "merge s0",
        "dump",
        w("m", 40 * K, K, K, 40960),
        "status")),
)

REFUSALS = (  # tables 6.1 refuses, and two it takes (the fragment's INPUT/refusals)
    "snapshot ORIGIN COW P 7",
    "snapshot ORIGIN COW X 8",
    "snapshot ORIGIN COW PX 8",
    "snapshot ORIGIN ORIGIN P 8",
    "snapshot ORIGIN COW P",
    "snapshot ORIGIN COW N 0",
    "snapshot ORIGIN COW P 8 1 bogus",
    "snapshot ORIGIN COW P 8 1 discard_passdown_origin",
    "snapshot ORIGIN COW P 8 3 discard_zeroes_cow",
    "snapshot-origin ORIGIN COW",
    "snapshot ORIGIN COW p 8 2 discard_zeroes_cow discard_passdown_origin",
    "snapshot ORIGIN COW No 16",
)


def data() -> bytes:
    return random.Random(13).randbytes(DATA_SIZE)


def initial_origin() -> bytes:
    return random.Random(7).randbytes(ORIGIN_SIZE)


Rows = dict[str, bytes]
_DEVNO = re.compile(rb"\b\d+:\d+\b")


def normalize(listing: bytes) -> bytes:
    """dmsetup status/table of every device: lines sorted by name, device numbers (the
    guest's loop devices, our keys' numbers) as DEV, trailing blanks dropped."""
    lines = [_DEVNO.sub(b"DEV", line).rstrip() for line in listing.splitlines()]
    return b"".join(line + b"\n" for line in sorted(lines))


class Side:
    """A scenario on minidisk, named as the fragment names it: linear devices S.lo and
    S.lcN over the pieces of disk.img, the origin S.o, snapshots S.sN, the merge S.m."""

    def __init__(self, scenario: Scenario, directory: Path, read_only: bool = False) -> None:
        self.s = scenario
        self.disk = FileDevice(str(directory / "disk.img"), read_only=read_only)
        devices: dict[str, BlockDevice] = {"/dev/disk": self.disk}
        self.ns = DeviceDict(devices)
        self.reg = Registry(self.ns, self.ns)
        self.places = scenario.places()
        self.sectors = self.places[0][1]
        self.read_only = read_only
        self.live: list[str] = []
        self.pieces: list[str] = []

    def name(self, dev: str) -> str:
        return f"{self.s.name}.{dev}"

    def key(self, dev: str) -> str:
        return f"/dev/mapper/{self.name(dev)}"

    async def cut(self) -> None:
        for i, (start, length) in enumerate(self.places):
            piece = "lo" if i == 0 else f"lc{i - 1}"
            await self.reg.create(self.name(piece), f"0 {length} linear /dev/disk {start}",
                                  read_only=self.read_only)
            self.pieces.append(piece)

    async def create(self, reload: bool = False) -> int:
        try:
            await self.reg.create(self.name("o"),
                                  f"0 {self.sectors} snapshot-origin {self.key('lo')}",
                                  read_only=self.read_only)
            self.live = ["o"]
            for i, snap in enumerate(self.s.snaps):
                chunk = snap.reload_chunk if reload and snap.reload_chunk else snap.chunk
                await self.reg.create(
                    self.name(f"s{i}"), f"0 {self.sectors} snapshot {self.key('lo')} "
                                        f"{self.key(f'lc{i}')} {snap.store} {chunk}",
                    read_only=self.read_only)
                self.live.append(f"s{i}")
        except (OSError, ValueError):
            return 1
        return 0

    async def remove(self, *devs: str) -> None:
        for dev in devs:
            await self.reg.remove(self.name(dev))
            self.live.remove(dev)

    async def close(self) -> None:
        await self.remove(*self.live)
        for piece in self.pieces:
            await self.reg.remove(self.name(piece))
        await self.disk.close()

    def listing(self, status: bool) -> bytes:
        lines = []
        for name in self.reg.names():
            if status:
                lines += [f"{name}: {a} {b} {t} {text}" for a, b, t, text in
                          self.reg.status(name)]
            else:
                lines += [f"{name}: {a} {b} {t} {' '.join(args)}" for a, b, t, args in
                          self.reg.table(name)]
        return normalize("".join(line + "\n" for line in lines).encode())

    async def dump(self, rows: Rows, prefix: str, devs: list[str]) -> None:
        for d in devs:
            dev = self.reg.get(self.name(d))
            out = bytearray()
            try:
                for offset in range(0, dev.size, DUMP_STEP):
                    buf = bytearray(min(DUMP_STEP, dev.size - offset))
                    await dev.pread(memoryview(buf), offset)
                    out += buf
            except OSError:
                rows[f"{prefix}.{d}"], rows[f"{prefix}.{d}.rc"] = b"", b"1\n"
                continue
            rows[f"{prefix}.{d}"] = bytes(out)

    async def write(self, dev: str, offset: int, length: int, bs: int,
                    source: bytes) -> int:
        device = self.reg.get(self.name(dev))
        for pos in range(0, length, bs):
            try:
                await device.pwrite(memoryview(bytearray(source[pos:pos + bs])), offset + pos)
            except OSError:
                return 1
        return 0

    async def merge(self, snap: str) -> None:
        await self.remove("o", snap)
        i = int(snap[1:])
        spec = self.s.snaps[i]
        await self.reg.create(self.name("m"), f"0 {self.sectors} snapshot-merge "
                                              f"{self.key('lo')} {self.key(f'lc{i}')} "
                                              f"{spec.store} {spec.chunk}")
        self.live.insert(0, "m")
        target = self.reg.get(self.name("m")).live.targets[0]
        assert isinstance(target, SnapshotMerge)
        await target.wait_merged()

    def snapshot_table(self, snap: str, target: str = "snapshot",
                       reload: bool = False) -> str:
        i = int(snap[1:])
        spec = self.s.snaps[i]
        chunk = spec.reload_chunk if reload and spec.reload_chunk else spec.chunk
        return (f"0 {self.sectors} {target} {self.key('lo')} {self.key(f'lc{i}')} "
                f"{spec.store} {chunk}")

    async def handover(self, snap: str) -> int:
        try:
            await self.reg.suspend(self.name(snap))
            await self.reg.load(self.name(snap), self.snapshot_table(snap, reload=True))
            await self.reg.resume(self.name(snap))
        except (OSError, ValueError):
            return 1
        return 0

    async def lvm_merge(self, snap: str) -> None:
        await self.reg.suspend(self.name(snap))
        await self.reg.suspend(self.name("o"))
        await self.reg.load(self.name("o"), self.snapshot_table(snap, "snapshot-merge"))
        await self.reg.resume(self.name("o"))
        target = self.reg.get(self.name("o")).live.targets[0]
        assert isinstance(target, SnapshotMerge)
        await target.wait_merged()

    async def run(self, rows: Rows, source: bytes) -> None:
        await self.cut()
        rows["create.rc"] = f"{await self.create()}\n".encode()
        for n, line in enumerate(self.s.ops, 1):
            at = f"{n:03d}"
            op, *args = line.split()
            if op == "w":
                dev, offset, length, bs, start = args[0], *map(int, args[1:])
                rc = await self.write(dev, offset, length, bs, source[start:start + length])
                rows[f"{at}.rc"] = f"{rc}\n".encode()
            elif op == "status":
                rows[f"{at}.status"] = self.listing(status=True)
            elif op == "table":
                rows[f"{at}.table"] = self.listing(status=False)
            elif op == "dump":
                await self.dump(rows, at, self.live)
            elif op == "cycle":  # (the fragment's suspend and resume)
                await self.reg.suspend(self.name("o"))
                await self.reg.resume(self.name("o"))
            elif op == "reload":
                await self.remove(*self.live)
                rows[f"{at}.rc"] = f"{await self.create(reload=True)}\n".encode()
            elif op == "merge":
                await self.merge(args[0])
                rows[f"{at}.status"] = self.listing(status=True)
            elif op == "handover":
                rows[f"{at}.rc"] = f"{await self.handover(args[0])}\n".encode()
            elif op == "lvmmerge":
                await self.lvm_merge(args[0])
                rows[f"{at}.status"] = self.listing(status=True)
                await self.remove(args[0])
            else:
                raise ValueError(f"unknown operation {line!r}")


async def open_files(scenario: Scenario, directory: Path, prefix: str) -> Rows:
    """`prefix.*` rows of a scenario's disk.img opened read-only, as the fragment's host.*:
    statuses, tables, every snapshot's contents."""
    side = Side(scenario, directory, read_only=True)
    rows: Rows = {}
    try:
        await side.cut()
        rows[f"{prefix}.rc"] = f"{await side.create()}\n".encode()
        rows[f"{prefix}.status"] = side.listing(status=True)
        rows[f"{prefix}.table"] = side.listing(status=False)
        await side.dump(rows, prefix, [f"s{i}" for i in range(len(scenario.snaps))])
    finally:
        await side.close()
    return rows


async def run_scenario(scenario: Scenario, directory: Path) -> Rows:
    """Run `scenario` on minidisk from directory/init, leaving its files in directory/host;
    its rows, and host.* (those files opened afresh)."""
    host = directory / "host"
    shutil.copytree(directory / "init", host)
    side = Side(scenario, host)
    rows: Rows = {}
    try:
        await side.run(rows, (directory.parent / "data.bin").read_bytes())
    finally:
        await side.close()
    rows.update(await open_files(scenario, host, "host"))
    return rows


def prepare(directory: Path) -> dict[str, Rows]:
    """Lay out the fragment's input (guest/dm_formats_snapshot.sh) and run every scenario
    on minidisk; returns each scenario's rows."""
    directory.mkdir(parents=True)
    (directory / "data.bin").write_bytes(data())
    (directory / "refusals").write_text("".join(t + "\n" for t in REFUSALS))
    results: dict[str, Rows] = {}
    for scenario in SCENARIOS:
        sdir = directory / scenario.name
        (sdir / "init").mkdir(parents=True)
        (sdir / "spec").write_text(scenario.spec())
        (sdir / "ops").write_text("".join(op + "\n" for op in scenario.ops))
        (sdir / "init" / "disk.img").write_bytes(
            initial_origin() + bytes(sum(snap.cow_size for snap in scenario.snaps)))
        results[scenario.name] = asyncio.run(run_scenario(scenario, sdir))
    return results


def guest_rows(directory: Path, prefix: str = "") -> Rows:
    """A scenario's rows as the fragment left them (listings normalized)."""
    rows: Rows = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name.startswith(prefix):
            value = path.read_bytes()
            rows[path.name] = normalize(value) if path.suffix in (".status", ".table") \
                else value
    return rows


def kernel_refusals(dmesg: str) -> list[str]:
    """The reason 6.1 logged for each table of REFUSALS ("" if none), with its errno:
    what follows `device-mapper: table: MAJ:MIN: ` between the fragment's markers."""
    reasons: list[str] = []
    for part in dmesg.split("dm_formats refusal ")[1:len(REFUSALS) + 1]:
        found = re.findall(r"device-mapper: table: \d+:\d+: (.*)", part)
        reasons.append(found[-1].strip() if found else "")
    return reasons


async def refusal(table: str) -> tuple[int, str, str]:
    """(rc, reason as 6.1 logs it, `dmsetup table` line's store arguments) of one of
    REFUSALS on minidisk."""
    devices: dict[str, BlockDevice] = {
        "/dev/origin": MemoryDevice(256 << 10), "/dev/cow": MemoryDevice(256 << 10)}
    ns = DeviceDict(devices)
    reg = Registry(ns, ns)
    text = table.replace("ORIGIN", "/dev/origin").replace("COW", "/dev/cow")
    return await try_table(reg, f"0 512 {text}", 2)
