"""snapshot-origin, snapshot and snapshot-merge on the host (the kernel's own judgement of
the same code is tests/vm/test_dm_formats.py).

Pattern stompers (dmtest's PatternStomper, in-process) write seeded patterns to the origin
and to snapshots, concurrently, and every device must read what was written through it or,
for a snapshot, what the origin held when the snapshot was taken; reopening finds the same
exceptions on disk; full stores give Invalid / Overflow exactly when 6.1 does; a merge runs
to completion while it is written to.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Iterator

import pytest
from tests.dm.dm_helpers import SECTOR, pattern, read, run, write

from minidisk.device.api import BlockDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry
from minidisk.dm.cowstore import EXCEPTION, HEADER, SNAP_MAGIC
from minidisk.dm.table import TableError
from minidisk.dm.targets.snapshot import Snapshot, SnapshotMerge

K = 4096
ORIGIN = 1 << 20
SECTORS = ORIGIN // SECTOR


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Invalidations and overflows log errors; here they are what is tested."""
    logging.disable(logging.ERROR)
    yield
    logging.disable(logging.NOTSET)


class Recording(MemoryDevice):
    """A memory device that records its writes and flushes, in order."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[str, int, int, bool]] = []

    async def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self.log.append(("write", offset, len(buf), fua))
        await super().pwrite(buf, offset, fua)

    async def flush(self) -> None:
        self.log.append(("flush", 0, 0, False))
        await super().flush()


def setup(*cows: int, origin: bytes | None = None) -> tuple[Registry, DeviceDict]:
    devices: dict[str, BlockDevice] = {"/dev/base": MemoryDevice(ORIGIN)}
    for i, size in enumerate(cows):
        devices[f"/dev/cow{i}"] = Recording(size)
    ns = DeviceDict(devices)
    return Registry(ns, ns), ns


async def fill_origin(ns: DeviceDict, seed: int = 1) -> bytes:
    data = pattern(seed, ORIGIN)
    await write(ns.devices["/dev/base"], 0, data)
    return data


async def snapshots(reg: Registry, *stores: str) -> None:
    """The origin, then one snapshot per store spec, then the origin suspended and resumed
    (as LVM does, so that it splits writes at the snapshots' chunk size)."""
    await reg.create("base", f"0 {SECTORS} snapshot-origin /dev/base")
    for i, store in enumerate(stores):
        await reg.create(f"snap{i}", f"0 {SECTORS} snapshot /dev/base /dev/cow{i} {store}")
    await reg.suspend("base")
    await reg.resume("base")


def status(reg: Registry, name: str) -> str:
    return reg.status(name)[0][3]


class Stomper:
    """Seeded writes of random blocks of one device, with what each block must hold."""

    def __init__(self, device: BlockDevice, seed: int, expected: bytes | bytearray) -> None:
        self.device = device
        self.rng = random.Random(seed)
        self.seed = seed
        self.expected = bytearray(expected)

    async def stomp(self, count: int, max_blocks: int = 4, unit: int = 512) -> None:
        for i in range(count):
            length = self.rng.randrange(1, max_blocks * K // unit + 1) * unit
            offset = self.rng.randrange(0, (ORIGIN - length) // unit + 1) * unit
            data = pattern(self.seed * 100_000 + i, length)
            await write(self.device, offset, data)
            self.expected[offset:offset + length] = data
            await asyncio.sleep(0)

    async def verify(self, device: BlockDevice | None = None) -> None:
        got = await read(device or self.device, 0, ORIGIN)
        if got != bytes(self.expected):
            bad = [i // K for i in range(0, ORIGIN, K)
                   if got[i:i + K] != self.expected[i:i + K]]
            raise AssertionError(f"blocks differ: {bad[:20]}")


def test_origin_writes_copy_out_to_every_snapshot() -> None:
    async def main() -> None:
        reg, ns = setup(2 << 20, 2 << 20, 2 << 20)
        before = await fill_origin(ns)
        await snapshots(reg, "P 8", "P 1", "N 32")
        origin = Stomper(reg.get("base"), 1, before)
        await origin.stomp(60)
        await origin.verify()
        await origin.verify(ns.devices["/dev/base"])
        for i in range(3):
            assert await read(reg.get(f"snap{i}"), 0, ORIGIN) == before, f"snap{i}"
    run(main())


async def one_snapshot_of_4k_chunks() -> tuple[Registry, BlockDevice, bytes]:
    """(registry, snapshot `snap0` (P, 4 KiB chunks) of a filled origin, the origin's
    bytes)."""
    reg, ns = setup(2 << 20)
    before = await fill_origin(ns)
    await snapshots(reg, "P 8")
    return reg, reg.get("snap0"), before


def test_reads_spanning_runs_of_exceptions_and_origin_chunks() -> None:
    """A snapshot reads a run of chunks at once (exceptions next to each other in the COW
    device, or chunks without one); every span, from any offset, reads what was written
    there or else the origin's bytes, also where writes in reverse order left exceptions out
    of order in the COW device."""
    async def main() -> None:
        reg, snap, before = await one_snapshot_of_4k_chunks()
        expected = bytearray(before)
        writes = [(0, 3 * K), (5 * K, K), (9 * K + 512, 2 * K), (20 * K, 4 * K)]
        writes += [(40 * K - i * K, K) for i in range(4)]  # exceptions in reverse order
        for n, (offset, length) in enumerate(writes):
            data = pattern(50 + n, length)
            await write(snap, offset, data)
            expected[offset:offset + length] = data
        rng = random.Random(5)
        for _ in range(200):
            offset = rng.randrange(0, 48 * K // SECTOR) * SECTOR
            length = rng.randrange(1, 24 * K // SECTOR) * SECTOR
            assert await read(snap, offset, length) == expected[offset:offset + length], \
                (offset, length)
        assert await read(snap, 0, ORIGIN) == bytes(expected)
    run(main())


def test_writes_spanning_runs_of_exceptions_and_new_chunks() -> None:
    """A snapshot writes a run of chunks whose exceptions follow each other in the COW
    device at once; random spans over such runs, over exceptions out of order and over
    chunks that have none yet (unaligned at both ends) leave exactly the model's bytes,
    and the origin keeps its own."""
    async def main() -> None:
        reg, snap, before = await one_snapshot_of_4k_chunks()
        expected = bytearray(before)
        rng = random.Random(7)
        for i in range(4):  # exceptions in reverse order
            data = pattern(70 + i, K)
            await write(snap, (30 - i) * K, data)
            expected[(30 - i) * K:(31 - i) * K] = data
        for n in range(150):
            offset = rng.randrange(0, 40 * K // SECTOR) * SECTOR
            length = rng.randrange(1, 12 * K // SECTOR) * SECTOR
            data = pattern(100 + n, length)
            await write(snap, offset, data)
            expected[offset:offset + length] = data
        assert await read(snap, 0, ORIGIN) == bytes(expected)
        assert await read(reg.get("base"), 0, ORIGIN) == before
    run(main())


def test_stomping_origin_and_snapshots_at_once() -> None:
    """Writes to the snapshots never reach the origin nor each other; writes to the origin
    never reach a snapshot; all at the same time, chunks shared between them."""
    async def main() -> None:
        reg, ns = setup(2 << 20, 2 << 20)
        before = await fill_origin(ns)
        await snapshots(reg, "P 8", "PO 16")
        origin = Stomper(reg.get("base"), 1, before)
        snaps = [Stomper(reg.get(f"snap{i}"), 10 + i, before) for i in range(2)]
        await asyncio.gather(origin.stomp(80), *(s.stomp(80) for s in snaps))
        await origin.verify()
        for s in snaps:
            await s.verify()
        assert status(reg, "snap0") != "Invalid" and status(reg, "snap1") != "Overflow"
    run(main())


def test_reopen_finds_the_same_exceptions() -> None:
    async def main() -> None:
        reg, ns = setup(2 << 20)
        before = await fill_origin(ns)
        await snapshots(reg, "P 8")
        origin = Stomper(reg.get("base"), 3, before)
        snap = Stomper(reg.get("snap0"), 4, before)
        await asyncio.gather(origin.stomp(30), snap.stomp(30))
        target = reg.get("snap0").live.targets[0]
        assert isinstance(target, Snapshot)
        exceptions = dict(target.complete)
        used = status(reg, "snap0")
        await reg.remove("snap0")
        await reg.remove("base")
        # The COW device, read as the kernel reads it: header, then areas of 256 pairs.
        cow = ns.devices["/dev/cow0"]
        assert HEADER.unpack(await read(cow, 0, HEADER.size)) == (SNAP_MAGIC, 1, 1, 8)
        on_disk: dict[int, int] = {}
        area = 0
        while True:
            raw = await read(cow, (1 + area * 257) * K, K)
            pairs = [EXCEPTION.unpack_from(raw, i * 16) for i in range(256)]
            on_disk.update((old, new) for old, new in pairs if new)
            if any(new == 0 for _, new in pairs):
                break
            area += 1
        assert on_disk == exceptions
        await snapshots(reg, "P 8")
        assert status(reg, "snap0") == used
        await snap.verify(reg.get("snap0"))
        await origin.verify(reg.get("base"))
    run(main())


def test_commit_order_data_then_area_with_flush_and_fua() -> None:
    async def main() -> None:
        reg, ns = setup(256 << 10)
        await fill_origin(ns)
        await snapshots(reg, "P 8")
        cow = ns.devices["/dev/cow0"]
        assert isinstance(cow, Recording)
        cow.log.clear()
        await write(reg.get("base"), 5 * K, pattern(9, K))
        # The data chunk (new chunk 2), a flush, then area 0 (chunk 1) with FUA.
        assert cow.log == [("write", 2 * K, K, False), ("flush", 0, 0, False),
                           ("write", 1 * K, K, True)]
    run(main())


def test_an_area_filling_zeroes_the_next_one_first() -> None:
    async def main() -> None:
        reg, ns = setup(64 << 10)
        await fill_origin(ns)
        await snapshots(reg, "P 1")  # 32 exceptions an area of 512 bytes
        cow = ns.devices["/dev/cow0"]
        assert isinstance(cow, Recording)
        await write(cow, 34 * SECTOR, b"\xff" * SECTOR)  # where area 1 will be
        cow.log.clear()
        await write(reg.get("base"), 0, pattern(2, 32 * SECTOR))
        area1 = [entry for entry in cow.log if entry[1] == 34 * SECTOR]
        assert area1 == [("write", 34 * SECTOR, SECTOR, False)]
        last_area0 = max(i for i, e in enumerate(cow.log) if e[1] == SECTOR)
        assert cow.log.index(area1[0]) < last_area0
        assert status(reg, "snap0") == f"{2 + 32 + 1}/128 3"
    run(main())


def test_full_store_p_is_invalidated_by_a_snapshot_write() -> None:
    async def main() -> None:
        reg, ns = setup(48 << 10)  # header, area, 10 data chunks
        await fill_origin(ns)
        await snapshots(reg, "P 8")
        snap = reg.get("snap0")
        for i in range(10):
            await write(snap, i * K, pattern(i, K))
        assert status(reg, "snap0") == "96/96 16"
        events = snap.event_nr
        with pytest.raises(OSError) as e:
            await write(snap, 10 * K, pattern(10, K))
        assert e.value.errno == errno.EIO
        assert status(reg, "snap0") == "Invalid" and snap.event_nr == events + 1
        with pytest.raises(OSError):
            await read(snap, 0, K)
        cow = ns.devices["/dev/cow0"]
        assert HEADER.unpack(await read(cow, 0, HEADER.size)) == (SNAP_MAGIC, 0, 1, 8)
        await reg.remove("snap0")
        await reg.create("snap0", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        assert status(reg, "snap0") == "Invalid"  # loads, as 6.1's: invalid for good
    run(main())


def test_full_store_po_overflows_on_a_snapshot_write_but_origin_writes_invalidate() -> None:
    async def main() -> None:
        reg, ns = setup(48 << 10, 48 << 10)
        before = await fill_origin(ns)
        await snapshots(reg, "PO 8", "PO 8")
        snap = reg.get("snap0")
        for i in range(10):
            await write(snap, i * K, pattern(i, K))
        with pytest.raises(OSError):
            await write(snap, 10 * K, pattern(10, K))
        assert status(reg, "snap0") == "Overflow"
        with pytest.raises(OSError):  # already-mapped chunks refuse writes too
            await write(snap, 0, pattern(0, K))
        assert await read(snap, 0, K) == pattern(0, K)  # reads go on
        assert await read(snap, 20 * K, K) == before[20 * K:21 * K]
        # An origin write the overflowed snapshot cannot take a copy of invalidates it;
        # snap1 fills by origin writes and is invalidated too, PO or not.
        for i in range(11):
            await write(reg.get("base"), (20 + i) * K, pattern(100 + i, K))
            if i == 9:
                assert status(reg, "snap1") == "96/96 16"
        assert status(reg, "snap0") == "Invalid"
        assert status(reg, "snap1") == "Invalid"
    run(main())


def test_stale_split_boundary_copies_only_the_first_chunk() -> None:
    """6.1's origin splits writes at the boundary it computed when it was resumed: loaded
    without that, a snapshot with smaller chunks gets only the first chunk of a write."""
    async def main() -> None:
        reg, ns = setup(256 << 10)
        before = await fill_origin(ns)
        await reg.create("base", f"0 {SECTORS} snapshot-origin /dev/base")
        await reg.create("snap0", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 1")
        await write(reg.get("base"), 0, pattern(5, K))
        got = await read(reg.get("snap0"), 0, K)
        assert got[:SECTOR] == before[:SECTOR]
        assert got[SECTOR:] == pattern(5, K)[SECTOR:]
        await reg.suspend("base")
        await reg.resume("base")
        await write(reg.get("base"), K, pattern(6, K))
        assert await read(reg.get("snap0"), K, K) == before[K:2 * K]
    run(main())


def test_loading_a_snapshot_drains_origin_writes_in_flight() -> None:
    """6.1 loads and resumes a snapshot beside a live origin (it suspends the origin's
    queue itself meanwhile): a write in flight is either wholly before the snapshot or
    copied out."""
    async def main() -> None:
        reg, ns = setup(256 << 10)
        before = await fill_origin(ns)
        await reg.create("base", f"0 {SECTORS} snapshot-origin /dev/base")
        writes = [asyncio.ensure_future(write(reg.get("base"), i * K, pattern(i, K)))
                  for i in range(16)]
        await asyncio.sleep(0)
        await reg.create("snap0", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        await asyncio.gather(*writes)
        seen = await read(reg.get("snap0"), 0, 16 * K)
        for i in range(16):
            assert seen[i * K:(i + 1) * K] in (before[i * K:(i + 1) * K], pattern(i, K))
    run(main())


def test_reload_hands_the_exceptions_over() -> None:
    async def main() -> None:
        reg, ns = setup(2 << 20)
        before = await fill_origin(ns)
        await snapshots(reg, "P 8")
        snap = Stomper(reg.get("snap0"), 7, before)
        await snap.stomp(10)
        old = reg.get("snap0").live.targets[0]
        await reg.suspend("snap0")
        await reg.load("snap0", f"0 {SECTORS} snapshot /dev/base /dev/cow0 PO 8")
        await reg.resume("snap0")
        assert reg.table("snap0")[0][3][2:] == ["PO", "8"]
        assert isinstance(old, Snapshot) and not old.valid
        await snap.verify()
        await Stomper(reg.get("base"), 8, before).stomp(10)
        await snap.stomp(10)
        await snap.verify()
    run(main())


def test_merge_runs_to_completion_under_io() -> None:
    async def main() -> None:
        reg, ns = setup(2 << 20, 2 << 20)
        before = await fill_origin(ns)
        await snapshots(reg, "P 8", "P 8")
        snap = Stomper(reg.get("snap0"), 11, before)
        await snap.stomp(60, max_blocks=8)
        other = await read(reg.get("snap1"), 0, ORIGIN)
        # LVM's merge: the snapshot device suspended, the origin's table swapped for
        # snapshot-merge of its COW (which takes the exceptions over).
        await reg.suspend("snap0")
        await reg.suspend("base")
        await reg.load("base", f"0 {SECTORS} snapshot-merge /dev/base /dev/cow0 P 8")
        await reg.resume("base")
        merge = reg.get("base").live.targets[0]
        assert isinstance(merge, SnapshotMerge)
        await reg.resume("snap0")
        with pytest.raises(OSError):  # handed over: the snapshot device is invalid
            await read(reg.get("snap0"), 0, K)
        # Write through the merging device meanwhile, to merged and unmerged chunks.
        writer = Stomper(reg.get("base"), 12, snap.expected)
        await asyncio.gather(writer.stomp(40, max_blocks=2), merge.wait_merged())
        await merge.wait_merged()
        assert not merge.complete and status(reg, "base") == "16/4096 16"
        await writer.verify()
        await writer.verify(ns.devices["/dev/base"])
        assert await read(reg.get("snap1"), 0, ORIGIN) == other  # copied out first
    run(main())


def test_merge_survives_suspend_and_resume() -> None:
    async def main() -> None:
        reg, ns = setup(2 << 20)
        before = await fill_origin(ns)
        await snapshots(reg, "P 1")
        snap = Stomper(reg.get("snap0"), 13, before)
        await snap.stomp(30, max_blocks=4)
        await reg.remove("snap0")
        await reg.remove("base")
        await reg.create("base", f"0 {SECTORS} snapshot-merge /dev/base /dev/cow0 P 1")
        merge = reg.get("base").live.targets[0]
        assert isinstance(merge, SnapshotMerge)
        await reg.suspend("base")  # stops the merge between two steps
        await reg.resume("base")
        await merge.wait_merged()
        assert status(reg, "base") == "2/4096 2"
        await snap.verify(ns.devices["/dev/base"])
    run(main())


def test_transient_store() -> None:
    async def main() -> None:
        reg, ns = setup(64 << 10)
        before = await fill_origin(ns)
        await snapshots(reg, "N 8")
        assert status(reg, "snap0") == "0/128 0"
        await write(reg.get("base"), 0, pattern(3, 2 * K))
        await write(reg.get("snap0"), 5 * K, pattern(4, 100 * SECTOR // 100))
        assert status(reg, "snap0") == "24/128 0"
        assert reg.table("snap0")[0][3][2:] == ["N", "8"]
        assert (await read(reg.get("snap0"), 0, 2 * K)) == before[:2 * K]
        cow = ns.devices["/dev/cow0"]
        assert await read(cow, 0, 2 * K) == before[:2 * K]  # chunks from 0, no header
    run(main())


def test_table_rules() -> None:
    async def main() -> None:
        reg, ns = setup(64 << 10)
        await reg.create("base", f"0 {SECTORS} snapshot-origin /dev/base")
        cases = {
            "P 7": "Couldn't create exception store",
            "N 0": "Chunk size not set",
            "P 8 1 nope": "Unrecognised feature requested",
        }
        for args, reason in cases.items():
            with pytest.raises(ValueError, match=reason):
                await reg.create("s", f"0 {SECTORS} snapshot /dev/base /dev/cow0 {args}")
        await reg.create("s", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        # A second snapshot of the same COW while the first is live and a third waits:
        # the kernel's handover pairing.
        await reg.create("t")
        await reg.load("t", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        await reg.create("u")
        with pytest.raises(ValueError, match="handover failed"):
            await reg.load("u", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        with pytest.raises(ValueError, match="does not support snapshot-merge"):
            await reg.create("m", f"0 {SECTORS} snapshot-merge /dev/base /dev/cow0 N 8")
    run(main())


def test_a_store_with_a_bad_magic_is_refused_with_enxio() -> None:
    async def main() -> None:
        reg, ns = setup(64 << 10)
        await write(ns.devices["/dev/cow0"], 0, b"junkjunkjunkjunk")
        with pytest.raises(TableError, match="Failed to read snapshot metadata") as e:
            await reg.create("s", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        assert e.value.errno == errno.ENXIO
        assert not reg.devices and not ns.holds  # nothing left behind
    run(main())


def test_discard_zeroes_cow() -> None:
    """A discard of a whole chunk the snapshot has zeroes it there; of a chunk it has not,
    it does nothing (the snapshot still reads the origin's); passdown discards the origin."""
    async def main() -> None:
        reg, ns = setup(256 << 10)
        before = await fill_origin(ns)
        await reg.create("base", f"0 {SECTORS} snapshot-origin /dev/base")
        table = f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8 1 discard_zeroes_cow"
        await reg.create("snap0", table)
        snap = reg.get("snap0")
        assert snap.caps.trim
        await write(snap, 2 * K, pattern(2, K))
        await snap.trim(0, 4 * K)
        assert await read(snap, 2 * K, K) == bytes(K)
        assert await read(snap, 0, 2 * K) == before[:2 * K]
        assert reg.table("snap0")[0][3][2:] == ["P", "8", "1", "discard_zeroes_cow"]
        plain = f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8"
        await reg.remove("snap0")
        await reg.create("snap0", plain)
        assert not reg.get("snap0").caps.trim
    run(main())


def test_a_handover_source_removed_first_cancels_the_handover() -> None:
    async def main() -> None:
        reg, ns = setup(256 << 10)
        await fill_origin(ns)
        await snapshots(reg, "P 8")
        await reg.create("next")
        await reg.load("next", f"0 {SECTORS} snapshot /dev/base /dev/cow0 P 8")
        await reg.remove("snap0")
        await reg.resume("next")
        assert status(reg, "next") == "Invalid"
    run(main())
