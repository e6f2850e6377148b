"""thin-pool and thin: messages, provisioning, sharing, space, failures.

Every pool here keeps its metadata in a host file, and every test ends by running Debian's
`thin_check` on it (`ThinSetup.check`): whatever a test does, the metadata we leave must be
what the kernel's tools accept. The data device is a host file too, so that a test can
look at the data blocks the metadata names.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.dm.dm_helpers import (
    SECTOR,
    HeldDevice,
    idle_passes,
    pattern,
    read,
    registry_over,
    run,
    until,
    write,
)

from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict, Registry
from minidisk.dm.mapped import MappedDevice
from minidisk.dm.table import TableError
from minidisk.dm.targets import thin_pool
from minidisk.dm.targets.thin import Thin
from minidisk.dm.thin.btree import MISSING

MB = 1 << 20
BLOCK = 128  # sectors: 64 KiB data blocks
BB = BLOCK * SECTOR


class ThinSetup:
    """A metadata file and a data file under `tmp`, in a namespace as /dev/meta and
    /dev/data."""

    def __init__(self, tmp: Path, data_mb: int = 16, meta_mb: int = 4) -> None:
        self.meta = tmp / "meta.img"
        self.data = tmp / "data.img"
        self.meta.write_bytes(b"")
        self.data.write_bytes(b"")
        with open(self.meta, "r+b") as f:
            f.truncate(meta_mb * MB)
        with open(self.data, "r+b") as f:
            f.truncate(data_mb * MB)
        self.data_sectors = data_mb * MB // SECTOR
        self.devs: list[FileDevice] = []
        self.ns = self.namespace()

    def namespace(self) -> DeviceDict:
        meta, data = FileDevice(str(self.meta)), FileDevice(str(self.data))
        self.devs += [meta, data]
        return DeviceDict({"/dev/meta": meta, "/dev/data": data})

    def registry(self) -> Registry:
        return registry_over(self.ns)

    def pool_table(self, *features: str, low_water: int = 0,
                   sectors: int | None = None) -> str:
        feats = f" {len(features)} {' '.join(features)}" if features else ""
        return (f"0 {sectors or self.data_sectors} thin-pool /dev/meta /dev/data {BLOCK} "
                f"{low_water}{feats}")

    def close(self) -> None:
        for dev in self.devs:
            if dev.fd >= 0:
                os.close(dev.fd)
                dev.fd = -1

    def check(self) -> str:
        """thin_check on the metadata file: must be clean."""
        done = subprocess.run(["thin_check", str(self.meta)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def repair(self) -> None:
        """`thin_check --clear-needs-check-flag`: what an administrator runs on a pool
        that failed a commit, before it may be writable again."""
        subprocess.run(["thin_check", "--clear-needs-check-flag", str(self.meta)], check=True,
                       capture_output=True, timeout=60)

    def dump(self, *options: str) -> str:
        return subprocess.run(["thin_dump", *options, str(self.meta)], capture_output=True,
                              text=True, check=True, timeout=60).stdout


@pytest.fixture
def thin(tmp_path: Path) -> Iterator[ThinSetup]:
    setup = ThinSetup(tmp_path)
    yield setup
    setup.close()
    setup.check()


def pool_fields(reg: Registry, name: str = "pool") -> list[str]:
    (_, _, kind, text), = reg.status(name)
    assert kind == "thin-pool"
    return text.split()


def used_data(reg: Registry) -> int:
    return int(pool_fields(reg)[2].split("/")[0])


async def make_pool(thin: ThinSetup, reg: Registry, *features: str,
                    thins: int = 1, low_water: int = 0) -> list[MappedDevice]:
    await reg.create("pool", thin.pool_table(*features, low_water=low_water))
    out = []
    for i in range(1, thins + 1):
        await reg.message("pool", 0, ["create_thin", str(i)])
        out.append(await reg.create(f"thin{i}", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool {i}"))
    return out


async def teardown(reg: Registry) -> None:
    order = ["pool", "meta"]  # thins first, then the pool, then what it is over
    for name in sorted(reg.names(), key=lambda n: order.index(n) if n in order else -1):
        await reg.remove(name)


def test_fresh_pool_status_and_table(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        await reg.create("pool", thin.pool_table("skip_block_zeroing", "error_if_no_space",
                                                 low_water=7))
        fields = pool_fields(reg)
        # transaction 0, data 0 of 256 blocks (16 MiB / 64 KiB), no held root, rw,
        # 1024 metadata blocks (4 MiB) and their threshold min(1024, 1024 / 4);
        assert fields[0] == "0"
        used, total = map(int, fields[1].split("/"))
        # 102 of them (a tenth) are the reserve 6.1 counts as used.
        assert total == 1024 and 102 < used < 102 + 32
        assert fields[2:] == ["0/256", "-", "rw", "discard_passdown", "error_if_no_space",
                              "-", "256"]
        (_, _, _, args), = reg.table("pool")
        assert args[2:] == ["128", "7", "2", "skip_block_zeroing", "error_if_no_space"]
        await teardown(reg)

    run(go())
    assert '<superblock uuid="" time="0" transaction="0"' in thin.dump()


def test_transaction_id_is_compare_and_swap(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        await reg.create("pool", thin.pool_table())
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["set_transaction_id", "1", "2"])
        assert e.value.errno == errno.EINVAL
        assert pool_fields(reg)[0] == "0"
        await reg.message("pool", 0, ["set_transaction_id", "0", "5"])
        assert pool_fields(reg)[0] == "5"
        with pytest.raises(OSError):
            await reg.message("pool", 0, ["set_transaction_id", "0", "6"])
        await reg.message("pool", 0, ["set_transaction_id", "5", "6"])
        await teardown(reg)

    run(go())
    assert 'transaction="6"' in thin.dump()


def test_duplicate_and_bad_ids_are_refused(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        await reg.create("pool", thin.pool_table())
        await reg.message("pool", 0, ["create_thin", "1"])
        for msg in (["create_thin", "1"], ["create_snap", "1", "1"]):
            with pytest.raises(OSError) as e:
                await reg.message("pool", 0, msg)
            assert e.value.errno == errno.EEXIST
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["create_snap", "2", "9"])
        assert e.value.errno == errno.ENODATA
        for bad in (str(1 << 24), "-1", "x"):
            with pytest.raises(OSError) as e:
                await reg.message("pool", 0, ["create_thin", bad])
            assert e.value.errno == errno.EINVAL
        await reg.message("pool", 0, ["create_thin", str((1 << 24) - 1)])
        with pytest.raises(TableError, match="Couldn't open thin internal device"):
            await reg.create("t", f"0 {MB // SECTOR} thin /dev/mapper/pool 3")
        assert "t" not in reg.names()
        await teardown(reg)

    run(go())
    dump = thin.dump()
    assert dump.count("<device ") == 2 and f'dev_id="{(1 << 24) - 1}"' in dump


def test_delete_of_an_active_thin_is_refused_and_frees_its_blocks(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        for i in range(5):
            await write(t1, i * BB, pattern(i, BB))
        await t1.flush()
        assert used_data(reg) == 5
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["delete", "1"])
        assert e.value.errno == errno.EBUSY
        await reg.remove("thin1")
        await reg.message("pool", 0, ["delete", "1"])
        assert used_data(reg) == 0
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["delete", "1"])
        assert e.value.errno == errno.ENODATA
        await teardown(reg)

    run(go())
    assert "<device " not in thin.dump()


def test_snapshots_share_blocks_until_written(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        origin, = await make_pool(thin, reg)
        for i in range(8):
            await write(origin, i * BB, pattern(i, BB))
        await reg.suspend("thin1")
        await reg.message("pool", 0, ["create_snap", "2", "1"])
        await reg.resume("thin1")
        snap = await reg.create("snap", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 2")
        assert used_data(reg) == 8
        assert await read(snap, 0, 8 * BB) == await read(origin, 0, 8 * BB)
        # A partial write to the snapshot copies the rest of the shared block.
        await write(snap, 3 * BB + 512, b"s" * 512)
        assert used_data(reg) == 9
        old = pattern(3, BB)
        assert await read(snap, 3 * BB, BB) == old[:512] + b"s" * 512 + old[1024:]
        assert await read(origin, 3 * BB, BB) == pattern(3, BB)
        # Written again: no new block. The origin writing a shared block breaks sharing too.
        await write(snap, 3 * BB, b"t" * 512)
        await write(origin, 5 * BB, b"o" * 512)
        assert used_data(reg) == 10
        assert await read(snap, 5 * BB, BB) == pattern(5, BB)
        await origin.flush()
        (_, _, _, status), = reg.status("snap")
        assert status == f"{8 * BLOCK} {8 * BLOCK - 1}"
        await teardown(reg)

    run(go())
    dump = thin.dump()
    assert dump.count("<device ") == 2
    # Six blocks still shared: the same data blocks appear under both devices.
    assert 'creation_time="1"' in dump and 'snap_time="1"' in dump


def pool_of(device: MappedDevice) -> thin_pool.Pool:
    target = device.live.targets[0]
    assert isinstance(target, Thin)
    return target.pool


def test_reads_and_writes_across_mapped_unmapped_and_shared_blocks_match_a_model(
        thin: ThinSetup) -> None:
    """Random spans (inside one block, across several, unaligned) written to a thin and its
    snapshot, then read back at random spans: reads coalesce runs of blocks that lie next
    to each other on the data device, fill runs of unmapped blocks, and take a one-block
    request on a fast path with no lock; every byte must still be the model's."""
    reg = thin.registry()
    span = 40 * BB  # 40 of the pool's 256 blocks, for the origin and its snapshot each
    rng = random.Random(5)

    async def go() -> None:
        origin, = await make_pool(thin, reg)
        models = {"origin": bytearray(span)}
        devices = {"origin": origin}

        async def scribble(name: str, writes: int) -> None:
            for _ in range(writes):
                length = rng.choice([512, 4096, BB, BB + 4096, 3 * BB - 512])
                at = rng.randrange(0, span - length, 512)
                data = rng.randbytes(length)
                await write(devices[name], at, data)
                models[name][at:at + length] = data

        # Blocks provisioned out of order, so that some neighbours are next to each other
        # on the data device and some are not, and a third of the span stays unmapped.
        await scribble("origin", 25)
        await reg.suspend("thin1")
        await reg.message("pool", 0, ["create_snap", "2", "1"])
        await reg.resume("thin1")
        devices["snap"] = await reg.create("snap", f"0 {64 * MB // SECTOR} thin "
                                                   f"/dev/mapper/pool 2")
        models["snap"] = bytearray(models["origin"])
        await scribble("origin", 10)
        await scribble("snap", 10)
        for _ in range(300):
            name = rng.choice(["origin", "snap"])
            length = rng.choice([512, 4096, BB, 2 * BB, 7 * BB + 1536, span // 2])
            at = rng.randrange(0, span - length + 1, 512)
            got = await read(devices[name], at, length)
            assert got == models[name][at:at + length], (name, at, length)
        await teardown(reg)

    run(go())


@pytest.mark.parametrize("data_kind", ["file", "memory"])
@pytest.mark.parametrize("zeroing", [True, False])
def test_a_partial_first_write_zeroes_the_rest_of_its_block(thin: ThinSetup, data_kind: str,
                                                            zeroing: bool) -> None:
    """The data device holds old bytes everywhere (a block freed by a deleted thin, say):
    a partial write to a new block must leave the rest of it reading zeroes, whether the
    zeroes are written as a buffer or by the data device's write-zeroes; with
    skip_block_zeroing the old bytes show through, as in the kernel."""
    with open(thin.data, "r+b") as f:
        f.write(b"\xaa" * (thin.data_sectors * SECTOR))
    ns = thin.namespace()
    memory = MemoryDevice(thin.data_sectors * SECTOR)
    if data_kind == "memory":
        meta = FileDevice(str(thin.meta))
        thin.devs.append(meta)
        ns = DeviceDict({"/dev/meta": meta, "/dev/data": memory})
    reg = registry_over(ns)

    async def go() -> None:
        if data_kind == "memory":
            await write(memory, 0, b"\xaa" * (thin.data_sectors * SECTOR))
        features = () if zeroing else ("skip_block_zeroing",)
        t1, = await make_pool(thin, reg, *features)
        rest = b"\0" if zeroing else b"\xaa"
        await write(t1, 5 * BB + 4096, b"d" * 4096)
        assert await read(t1, 5 * BB, BB) == rest * 4096 + b"d" * 4096 + rest * (BB - 8192)
        await write(t1, 9 * BB, b"e" * 512)
        assert await read(t1, 9 * BB, BB) == b"e" * 512 + rest * (BB - 512)
        await write(t1, 11 * BB + BB - 512, b"f" * 512)
        assert await read(t1, 11 * BB, BB) == rest * (BB - 512) + b"f" * 512
        await teardown(reg)

    run(go())


def test_blocks_a_thin_remembers_for_its_fast_path_are_forgotten_when_metadata_changes(
        thin: ThinSetup) -> None:
    """route() remembers where provisioned blocks are; a snapshot (the blocks become
    shared), a discard (a block unmapped) or an aborted transaction must each stop it
    sending a read or write there."""
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        for b in range(4):
            await write(t1, b * BB, pattern(b, BB))
        await t1.flush()
        for b in range(4):
            assert await read(t1, b * BB, 4096) == pattern(b, BB)[:4096]
        target = t1.live.targets[0]
        assert isinstance(target, Thin) and len(target._fast) == 4
        # Unmapped, then written again: the write provisions a new block, which is where
        # the metadata (read again from disk at the end) says block 2 is.
        await t1.trim(2 * BB, BB)
        await write(t1, 2 * BB, b"r" * 4096)
        await t1.flush()
        assert await read(t1, 2 * BB, 4096) == b"r" * 4096
        await reg.suspend("thin1")
        await reg.message("pool", 0, ["create_snap", "2", "1"])
        await reg.resume("thin1")
        snap = await reg.create("snap", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 2")
        await write(t1, 0, b"o" * 4096)  # shared now: a new block, not the remembered one
        assert await read(snap, 0, 4096) == pattern(0, BB)[:4096]
        assert await read(t1, 0, 4096) == b"o" * 4096
        await t1.trim(BB, BB)
        assert await read(t1, BB, 4096) == bytes(4096)
        assert await read(snap, BB, 4096) == pattern(1, BB)[:4096]
        assert await read(snap, 2 * BB, 4096) == b"r" * 4096
        await t1.flush()
        assert await read(t1, 3 * BB, 4096) == pattern(3, BB)[:4096]  # remembered again
        await write(t1, 5 * BB, b"n" * 4096)  # provisioned in the transaction about to go
        await pool_of(t1).metadata_failed(OSError(errno.EIO, "injected"))
        assert await read(t1, 5 * BB, 4096) == bytes(4096)
        await teardown(reg)

    run(go())
    thin.repair()

    async def reopened() -> None:
        reg2 = registry_over(thin.namespace())
        await reg2.create("pool", thin.pool_table())
        t1 = await reg2.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        assert await read(t1, 2 * BB, 4096) == b"r" * 4096
        await teardown(reg2)

    run(reopened())


def test_lookups_without_the_lock_wait_while_a_metadata_change_is_half_done(
        thin: ThinSetup) -> None:
    """The lock-free lookup (`Pool.lookup_cached`) is safe only because nothing changes the
    btrees between two awaits: while the pool's lock is held (a change in progress, which
    may await a node read with a split half done), or a block is being provisioned, it
    must give way to the locked lookup."""
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        await write(t1, 0, pattern(1, BB))
        pool = pool_of(t1)
        assert pool.lookup_cached(1, 0) not in (None, MISSING)
        async with pool.lock:
            assert pool.lookup_cached(1, 0) is MISSING
            reader = asyncio.create_task(read(t1, 0, 4096))
            writer = asyncio.create_task(write(t1, 4096, b"w" * 4096))
            await idle_passes()
            assert not reader.done() and not writer.done()
        assert await reader == pattern(1, BB)[:4096]
        await writer
        assert await read(t1, 4096, 4096) == b"w" * 4096
        pool.cells[1, 0] = asyncio.Event()
        assert pool.lookup_cached(1, 0) is MISSING
        del pool.cells[1, 0]
        await teardown(reg)

    run(go())


def test_pool_usage_grows_only_by_blocks_written(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, t2 = await make_pool(thin, reg, thins=2)
        touched = {0, 1, 7, 100, 300}
        for b in touched:
            await write(t1, b * BB + 4096, pattern(b, 4096))  # partial: zero-filled
            await write(t1, b * BB + 8192, pattern(b + 1, 4096))  # same block again
        await write(t2, 2 * BB - 4096, pattern(9, 8192))  # across two blocks
        assert used_data(reg) == len(touched) + 2
        assert await read(t1, 7 * BB, 4096) == bytes(4096)
        assert await read(t1, 7 * BB + 4096, 8192) == pattern(7, 4096) + pattern(8, 4096)
        assert await read(t1, 2 * BB, BB) == bytes(BB)  # unprovisioned reads as zero
        (_, _, _, status), = reg.status("thin1")
        assert status == f"{len(touched) * BLOCK} {301 * BLOCK - 1}"
        await teardown(reg)

    run(go())


def test_data_and_mappings_survive_reopen(tmp_path: Path) -> None:
    thin = ThinSetup(tmp_path, data_mb=32)
    reg = thin.registry()
    blocks = list(range(0, 400, 3))

    async def first() -> None:
        t1, = await make_pool(thin, reg)
        for b in blocks:
            await write(t1, b * BB, pattern(b, 512))
        await teardown(reg)

    async def second() -> None:
        reg2 = registry_over(thin.namespace())
        await reg2.create("pool", thin.pool_table())
        t = await reg2.create("t", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        for b in blocks:
            assert await read(t, b * BB, 1024) == pattern(b, 512) + bytes(512)
        assert used_data(reg2) == len(blocks)
        await teardown(reg2)

    run(first())
    run(second())
    thin.close()
    thin.check()


def test_flush_commits_and_nothing_else_does(thin: ThinSetup,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thin_pool, "COMMIT_PERIOD", 3600.0)
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        await write(t1, 0, pattern(1, BB))
        assert "single_mapping" not in thin.dump()  # not committed yet
        await t1.flush()
        assert 'origin_block="0"' in thin.dump()
        await write(t1, 5 * BB, pattern(1, BB), fua=True)
        assert 'origin_block="5"' in thin.dump()
        # A FUA write into a block provisioned but not committed commits it, though the
        # block itself needs nothing new (the fast path must not take it: route.py).
        await write(t1, 7 * BB, b"p" * 4096)
        assert 'origin_block="7"' not in thin.dump()
        await write(t1, 7 * BB + 4096, b"f" * 4096, fua=True)
        assert 'origin_block="7"' in thin.dump()
        thin.check()
        await teardown(reg)

    run(go())


def test_commit_within_a_second_without_flush(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        await write(t1, 3 * BB, pattern(1, BB))
        for _ in range(50):
            await asyncio.sleep(0.1)
            if 'origin_block="3"' in thin.dump():
                break
        else:
            raise AssertionError("no commit within 5 s")
        await teardown(reg)

    run(go())


def test_low_water_mark_raises_one_event_per_resume(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg, low_water=250)
        pool = reg.get("pool")
        before = pool.event_nr
        for b in range(6):
            await write(t1, b * BB, pattern(b, BB))
        # Checked before each allocation, as alloc_data_block: 251 free before the 6th.
        assert pool.event_nr == before
        await write(t1, 6 * BB, pattern(6, BB))  # 250 free: at the mark
        assert pool.event_nr == before + 1
        await write(t1, 7 * BB, pattern(7, BB))
        assert pool.event_nr == before + 1
        await reg.suspend("pool")
        await reg.resume("pool")
        await write(t1, 8 * BB, pattern(8, BB))
        assert pool.event_nr == before + 2
        await teardown(reg)

    run(go())


def test_out_of_data_space_errors_at_once_with_error_if_no_space(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg, "error_if_no_space")
        for b in range(256):
            await write(t1, b * BB, pattern(b, 512))
        with pytest.raises(OSError) as e:
            await write(t1, 256 * BB, b"x" * 512)
        assert e.value.errno == errno.ENOSPC
        fields = pool_fields(reg)
        assert fields[2] == "256/256" and fields[4] == "out_of_data_space"
        # Provisioned blocks stay writable.
        await write(t1, 10 * BB, b"y" * 512)
        assert await read(t1, 10 * BB, 512) == b"y" * 512
        await t1.flush()
        await teardown(reg)

    run(go())


def test_out_of_data_space_queues_until_the_pool_grows(thin: ThinSetup) -> None:
    reg = thin.registry()
    thin.data_sectors = 8 * MB // SECTOR  # a 16 MiB file, a pool over half of it

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        for b in range(128):
            await write(t1, b * BB, pattern(b, 512))
        waiting = asyncio.ensure_future(write(t1, 200 * BB, b"q" * 512))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert pool_fields(reg)[4] == "out_of_data_space"
        await reg.load("pool", thin.pool_table(sectors=16 * MB // SECTOR))
        await reg.resume("pool")
        await asyncio.wait_for(waiting, 10)
        assert await read(t1, 200 * BB, 512) == b"q" * 512
        fields = pool_fields(reg)
        assert fields[2] == "129/256" and fields[4] == "rw"
        await teardown(reg)

    run(go())


def test_queued_writes_fail_after_no_space_timeout(thin: ThinSetup,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thin_pool, "no_space_timeout", 0.3)
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        for b in range(256):
            await write(t1, b * BB, pattern(b, 512))
        with pytest.raises(OSError) as e:
            await write(t1, 300 * BB, b"x" * 512)
        assert e.value.errno == errno.ENOSPC
        assert pool_fields(reg)[6] == "error_if_no_space"
        await teardown(reg)

    run(go())


def test_held_metadata_snapshot(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        await write(t1, 0, pattern(1, BB))
        await reg.message("pool", 0, ["reserve_metadata_snap"])
        held = pool_fields(reg)[3]
        assert held.isdigit()
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["reserve_metadata_snap"])
        assert e.value.errno == errno.EBUSY
        await write(t1, 9 * BB, pattern(2, BB))
        await t1.flush()
        thin.check()
        snap_dump = thin.dump(f"--metadata-snap={held}")
        assert 'origin_block="0"' in snap_dump and 'origin_block="9"' not in snap_dump
        assert 'origin_block="9"' in thin.dump()
        await reg.message("pool", 0, ["release_metadata_snap"])
        assert pool_fields(reg)[3] == "-"
        with pytest.raises(OSError):
            await reg.message("pool", 0, ["release_metadata_snap"])
        await teardown(reg)

    run(go())


def test_failed_commit_sets_needs_check_and_read_only(thin: ThinSetup) -> None:
    """dmtest's needs_check test: the metadata device's table is swapped for one that
    errors everywhere but the superblock; the commit fails, the pool goes read-only with
    needs_check -- here Fail, as 6.1's abort also has to read the space maps through the
    failing table -- and, loaded again over the good device, read-only with needs_check
    until `thin_check --clear-needs-check-flag` repairs it."""
    reg = thin.registry()
    meta_sectors = 4 * MB // SECTOR

    async def go() -> None:
        await reg.create("meta", f"0 {meta_sectors} linear /dev/meta 0")
        await reg.create("pool", f"0 {thin.data_sectors} thin-pool /dev/mapper/meta "
                                 f"/dev/data {BLOCK} 0")
        await reg.message("pool", 0, ["create_thin", "1"])
        t1 = await reg.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        await write(t1, 0, pattern(1, BB))
        await t1.flush()
        await reg.load("meta", f"0 8 linear /dev/meta 0\n8 {meta_sectors - 8} error")
        await reg.resume("meta")
        await write(t1, 4 * BB, pattern(2, BB))
        with pytest.raises(OSError):
            await t1.flush()
        assert reg.status("pool")[0][3] == "Fail"
        assert reg.status("thin1")[0][3] == "Fail"
        with pytest.raises(OSError):
            await write(t1, 8 * BB, b"z" * 512)
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["create_thin", "2"])
        assert e.value.errno == errno.EOPNOTSUPP
        await teardown(reg)

    run(go())
    assert 'flags="1"' in thin.dump()

    async def read_only() -> None:
        reg2 = registry_over(thin.namespace())
        await reg2.create("pool", thin.pool_table())
        fields = pool_fields(reg2)
        assert fields[4] == "ro" and fields[7] == "needs_check"
        t1 = await reg2.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        assert await read(t1, 0, BB) == pattern(1, BB)  # committed data still reads
        await write(t1, 0, b"w" * 512)  # a mapped, unshared block stays writable
        with pytest.raises(OSError):
            await write(t1, 8 * BB, b"z" * 512)  # needs a new block: refused
        with pytest.raises(OSError) as e:
            await reg2.message("pool", 0, ["create_thin", "2"])
        assert e.value.errno == errno.EOPNOTSUPP
        await teardown(reg2)

    run(read_only())
    thin.repair()
    assert 'flags="0"' in thin.dump()

    async def again() -> None:
        reg2 = registry_over(thin.namespace())
        await reg2.create("pool", thin.pool_table())
        assert pool_fields(reg2)[4] == "rw" and pool_fields(reg2)[7] == "-"
        await teardown(reg2)

    run(again())


def test_metadata_write_errors_under_load_leave_a_read_only_pool_that_keeps_flushed_data(
        thin: ThinSetup) -> None:
    """Fault injection under load: four writers keep provisioning blocks of two thins,
    writing into blocks they provisioned and flushing, when the metadata device's table is
    swapped for flakey with error_writes (always down) behind the superblock. The next
    commit fails; the pool marks needs_check and goes read-only (reads still work, so the
    transaction is aborted to the committed one, as 6.1 does). Then new blocks are
    refused; a thin untouched since its last commit still takes writes into its blocks,
    and its flush goes down to the data device. Loaded again over the good device, the
    pool is read-only with needs_check, every write acknowledged before a flush that
    returned with the pool still rw reads back, and so does the untouched thin's write;
    `thin_check --clear-needs-check-flag` makes the pool writable again."""
    reg = thin.registry()
    meta_sectors = 4 * MB // SECTOR
    durable: dict[tuple[int, int], bytes] = {}  # (thin, offset) -> bytes; each written once
    refused = [0]

    async def go() -> None:
        await reg.create("meta", f"0 {meta_sectors} linear /dev/meta 0")
        await reg.create("pool", f"0 {thin.data_sectors} thin-pool /dev/mapper/meta "
                                 f"/dev/data {BLOCK} 0")
        thins = {}
        for i in (1, 2, 3):
            await reg.message("pool", 0, ["create_thin", str(i)])
            thins[i] = await reg.create(f"thin{i}", f"0 {64 * MB // SECTOR} thin "
                                                   f"/dev/mapper/pool {i}")
        await write(thins[3], 0, pattern(3, 4096))
        await thins[3].flush()
        durable[3, 0] = pattern(3, 4096)
        swapped = asyncio.Event()

        async def writer(seed: int) -> None:
            rng = random.Random(seed)
            # Each writer its own virtual blocks, each offset written once: what a read
            # finds later is the one value written there, or what it was before.
            blocks = list(range(seed, 240, 4))
            rng.shuffle(blocks)
            pending: dict[tuple[int, int], bytes] = {}
            failures = 0
            for vblock in blocks:
                t = 1 + vblock % 2
                for within in (0, 8192):  # a new block, then a write into it
                    data = rng.randbytes(4096)
                    try:
                        await write(thins[t], vblock * BB + within, data)
                        pending[t, vblock * BB + within] = data
                        if rng.random() < 0.3:
                            await thins[t].flush()
                            # Returned with the pool still rw: all of it committed. (Once
                            # it is read-only a flush may pass, as 6.1's does for a thin
                            # whose changes went into the commit that failed.)
                            if pool_fields(reg)[4] == "rw":
                                durable.update(pending)
                            pending.clear()
                    except OSError:
                        pending.clear()
                        failures += 1
                        refused[0] += 1
                    await asyncio.sleep(0)
                if swapped.is_set() and failures >= 5:
                    return

        tasks = [asyncio.create_task(writer(seed)) for seed in range(4)]

        async def forty_flushed() -> None:  # flushes fsync the files: real time, not passes
            while len(durable) < 40:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(forty_flushed(), 30)
        await reg.load("meta", f"0 8 linear /dev/meta 0\n"
                               f"8 {meta_sectors - 8} flakey /dev/meta 8 0 1 1 error_writes")
        await reg.resume("meta")
        swapped.set()
        await asyncio.gather(*tasks)
        fields = pool_fields(reg)
        assert fields[4] == "ro" and fields[7] == "needs_check", fields
        with pytest.raises(OSError):
            await write(thins[1], 250 * BB, b"n" * 4096)  # a new block: refused
        await write(thins[3], 4096, b"u" * 4096)  # into a committed block of its own
        await thins[3].flush()
        durable[3, 4096] = b"u" * 4096
        for i in thins:
            await reg.remove(f"thin{i}")
        await reg.remove("pool")
        await reg.remove("meta")

    run(go())
    assert refused[0] > 0 and len(durable) >= 40

    async def reload() -> None:
        reg2 = registry_over(thin.namespace())
        await reg2.create("pool", thin.pool_table())
        fields = pool_fields(reg2)
        assert fields[4] == "ro" and fields[7] == "needs_check", fields
        for i in (1, 2, 3):
            t = await reg2.create(f"thin{i}", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool {i}")
            for (which, offset), data in durable.items():
                if which == i:
                    assert await read(t, offset, len(data)) == data, (i, offset)
        await teardown(reg2)

    run(reload())
    thin.repair()

    async def writable() -> None:
        reg2 = registry_over(thin.namespace())
        await reg2.create("pool", thin.pool_table())
        assert pool_fields(reg2)[4] == "rw"
        await teardown(reg2)

    run(writable())


def test_a_flush_waits_for_the_commit_that_took_its_thins_changes() -> None:
    """A commit under way has already taken the thin's changes (the thin no longer shows
    any), so a second flush finds nothing of its own to commit; it must still wait for
    that commit, which may fail, before it returns -- as 6.1's one worker ends a commit
    before it looks at the next flush. Held metadata writes keep the commit under way."""
    meta = HeldDevice(4 * MB)
    meta.release.set()
    reg = registry_over(DeviceDict({"/dev/meta": meta, "/dev/data": MemoryDevice(16 * MB)}))

    async def go() -> None:
        await reg.create("pool", f"0 {16 * MB // SECTOR} thin-pool /dev/meta /dev/data "
                                 f"{BLOCK} 0")
        await reg.message("pool", 0, ["create_thin", "1"])
        t1 = await reg.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        await write(t1, 0, b"x" * 4096)
        meta.release.clear()
        first = asyncio.create_task(t1.flush())
        await until(lambda: meta.held > 0)
        second = asyncio.create_task(t1.flush())
        await idle_passes()
        assert not second.done()
        meta.release.set()
        await first
        await second
        await teardown(reg)

    run(go())


def test_a_commit_waits_for_a_provisioning_under_way_and_new_ones_wait_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Committed metadata never maps a block whose data is not written: a commit (thin2's
    flush) that comes while a new block of thin1's is being written (held here) waits for
    it, and a
    provisioning that starts while that commit waits is held back until it is done."""
    monkeypatch.setattr(thin_pool, "COMMIT_PERIOD", 3600.0)  # no timer commit to wake it
    data = HeldDevice(16 * MB)
    data.release.set()
    meta = MemoryDevice(4 * MB)
    reg = registry_over(DeviceDict({"/dev/meta": meta, "/dev/data": data}))

    async def go() -> None:
        await reg.create("pool", f"0 {16 * MB // SECTOR} thin-pool /dev/meta /dev/data "
                                 f"{BLOCK} 0")
        thins = []
        for i in (1, 2):
            await reg.message("pool", 0, ["create_thin", str(i)])
            thins.append(await reg.create(f"thin{i}", f"0 {64 * MB // SECTOR} thin "
                                                      f"/dev/mapper/pool {i}"))
        t1, t2 = thins
        pool = pool_of(t1)
        await write(t2, 0, b"c" * 4096)  # a change of thin2's, for its flush to commit
        data.release.clear()
        first = asyncio.create_task(write(t1, 0, b"a" * 4096))
        await until(lambda: data.held > 0)
        flush = asyncio.create_task(t2.flush())
        await until(lambda: pool.committers > 0)
        second = asyncio.create_task(write(t1, 3 * BB, b"b" * 4096))
        await idle_passes()
        assert not flush.done() and not second.done() and pool.provisions == 1
        data.release.set()
        await first
        await asyncio.wait_for(flush, 10)
        await asyncio.wait_for(second, 10)
        assert await read(t1, 0, 4096) == b"a" * 4096
        assert await read(t1, 3 * BB, 4096) == b"b" * 4096
        await teardown(reg)

    run(go())


def test_a_flush_fails_on_a_thin_whose_changes_an_abort_lost(thin: ThinSetup) -> None:
    """6.1's aborted_with_changes: when a metadata operation fails and the transaction is
    aborted, a thin that had changed since the last commit fails every later flush (its
    writes are gone), while one that had not still flushes; both stay readable."""
    reg = thin.registry()

    async def go() -> None:
        t1, t2 = await make_pool(thin, reg, thins=2)
        await write(t2, 0, pattern(2, BB))
        await t2.flush()
        await write(t1, 0, pattern(1, BB))  # provisioned, not committed
        pool = pool_of(t1)
        await pool.metadata_failed(OSError(errno.EIO, "injected"))
        assert pool_fields(reg)[4] == "ro" and pool_fields(reg)[7] == "needs_check"
        with pytest.raises(OSError):
            await t1.flush()
        with pytest.raises(OSError):
            await write(t1, 0, b"x" * 512, fua=True)  # its block went with the abort
        await write(t2, 4096, b"y" * 4096, fua=True)
        await t2.flush()
        assert await read(t2, 0, 8192) == pattern(2, BB)[:4096] + b"y" * 4096
        assert await read(t1, 0, 512) == bytes(512)
        await teardown(reg)

    run(go())
    thin.repair()


def test_a_reload_refused_at_resume_leaves_the_device_suspended_on_the_new_table(
        thin: ThinSetup) -> None:
    """What 6.1 did in the guest: a pool reloaded shorter than its metadata's data size
    fails its preresume; `dmsetup info` then shows SUSPENDED with only a LIVE table, which
    is the new one (the old one is gone), and a second resume fails the same way. Loaded
    again with the right size, it resumes; the thin still reads its block."""
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        await write(t1, 0, pattern(1, BB))
        await t1.flush()
        await reg.remove("thin1")
        await reg.load("pool", thin.pool_table(sectors=thin.data_sectors // 2))
        for _ in range(2):
            with pytest.raises(OSError) as e:
                await reg.resume("pool")
            assert e.value.errno == errno.EINVAL
            info = reg.info("pool")
            assert info.suspended and info.live_table and not info.inactive_table
            (_, length, _, _), = reg.table("pool")
            assert length == thin.data_sectors // 2
        await reg.load("pool", thin.pool_table())
        await reg.resume("pool")
        assert not reg.info("pool").suspended
        t1 = await reg.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        assert await read(t1, 0, BB) == pattern(1, BB)
        await teardown(reg)

    run(go())


def test_table_errors(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        for table, word in (
            (f"0 {thin.data_sectors} thin-pool /dev/meta /dev/data 100 0", "Invalid block size"),
            (f"0 {thin.data_sectors} thin-pool /dev/meta /dev/data 128 x", "low water"),
            (f"0 {thin.data_sectors} thin-pool /dev/meta /dev/data 128 0 1 bogus",
             "Unrecognised pool feature"),
            (f"0 {thin.data_sectors} thin-pool /dev/meta /dev/data", "argument count"),
        ):
            with pytest.raises(TableError, match=word):
                await reg.create("p", table)
        await reg.create("pool", thin.pool_table())
        with pytest.raises(TableError, match="find pool"):
            await reg.create("t", "0 8 thin /dev/data 1")
        with pytest.raises(TableError, match="immutable"):
            await reg.load("pool", f"0 {thin.data_sectors} linear /dev/data 0")
        await teardown(reg)

    run(go())


def test_discard_unmaps_whole_blocks_and_passes_down_unshared_ones(thin: ThinSetup) -> None:
    reg = thin.registry()

    async def go() -> None:
        t1, = await make_pool(thin, reg)
        for b in range(6):
            await write(t1, b * BB, pattern(b, BB))
        await reg.suspend("thin1")
        await reg.message("pool", 0, ["create_snap", "2", "1"])
        await reg.resume("thin1")
        await write(t1, 4 * BB, b"n" * BB)  # block 4 of thin 1 no longer shared
        assert used_data(reg) == 7
        # Blocks 1..4 whole; half of block 0 and of block 5 stay.
        await t1.trim(BB // 2, 5 * BB)
        assert await read(t1, 0, BB) == pattern(0, BB)
        assert await read(t1, BB, 4 * BB) == bytes(4 * BB)
        assert await read(t1, 5 * BB, BB) == pattern(5, BB)
        assert used_data(reg) == 6  # only block 4's own copy was freed
        await t1.flush()
        (_, _, _, status), = reg.status("thin1")
        assert status == f"{2 * BLOCK} {6 * BLOCK - 1}"
        snap = await reg.create("snap", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 2")
        for b in range(6):
            assert await read(snap, b * BB, BB) == pattern(b, BB)
        await t1.trim(5 * BB, BB)
        (_, _, _, status), = reg.status("thin1")
        assert status == f"{BLOCK} {BLOCK - 1}"
        await teardown(reg)

    run(go())
    with open(thin.data, "rb") as f:  # block 4's own copy (data block 6) was trimmed
        f.seek(6 * BB)
        assert f.read(BB) == bytes(BB)


def test_read_only_pool(thin: ThinSetup) -> None:
    """read_only: refused on unformatted metadata; later the pool serves mapped blocks,
    refuses new ones and messages, and never writes the metadata."""
    reg = thin.registry()

    async def go() -> None:
        with pytest.raises(OSError) as e:
            await reg.create("pool", thin.pool_table("read_only"))
        assert e.value.errno == errno.EPERM
        assert not any(thin.meta.read_bytes()[:4096])
        assert not thin_pool._POOLS  # the refused table's pool is gone with it
        t1, = await make_pool(thin, reg)
        await write(t1, 0, pattern(1, BB))
        await teardown(reg)
        assert "mapping" in thin.dump()  # the pool was closed, so its mapping committed
        before = thin.meta.read_bytes()
        await reg.create("pool", thin.pool_table("read_only"))
        t1 = await reg.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        fields = pool_fields(reg)
        assert fields[4] == "ro" and fields[7] == "-"
        (_, _, _, args), = reg.table("pool")
        assert args[4:] == ["1", "read_only"]
        assert await read(t1, 0, BB) == pattern(1, BB)
        with pytest.raises(OSError):
            await write(t1, BB, b"x" * 512)
        with pytest.raises(OSError) as e:
            await reg.message("pool", 0, ["create_thin", "2"])
        assert e.value.errno == errno.EOPNOTSUPP
        await t1.flush()
        await teardown(reg)
        assert thin.meta.read_bytes() == before
        # Reloaded without read_only, the pool is writable again.
        await reg.create("pool", thin.pool_table())
        t1 = await reg.create("thin1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")
        await write(t1, BB, b"x" * 512)
        await teardown(reg)

    run(go())


def test_metadata_low_water_then_out_of_metadata_space_until_it_grows(
        thin: ThinSetup) -> None:
    """A 512 KiB metadata device (128 blocks: threshold 32, reserve 12): thins are made
    until the free blocks reach the threshold (one event), then the reserve (read-only,
    messages refused, no needs_check); a reload over a bigger device makes it rw again."""
    reg = thin.registry()

    async def go() -> None:
        await reg.create("meta", "0 1024 linear /dev/meta 0")
        await reg.create("pool", f"0 {thin.data_sectors} thin-pool /dev/mapper/meta "
                                 f"/dev/data {BLOCK} 0")
        pool = reg.get("pool")
        assert pool_fields(reg)[8] == "32"
        events = [pool.event_nr]
        made = 0
        with pytest.raises(OSError) as e:
            for made in range(1, 200):
                await reg.message("pool", 0, ["create_thin", str(made)])
                events.append(pool.event_nr)
        assert e.value.errno == errno.EOPNOTSUPP
        fields = pool_fields(reg)
        used, total = map(int, fields[1].split("/"))
        assert (used, total) == (128, 128)  # only the reserve is free, counted as used
        assert fields[4] == "ro" and fields[7] == "-"
        # One event at the threshold (some thins later the mode changes: the second).
        assert events[0] + 1 in events and pool.event_nr == events[0] + 2
        thin.check()
        await reg.suspend("pool")
        await reg.load("meta", f"0 {4 * MB // SECTOR} linear /dev/meta 0")
        await reg.resume("meta")
        await reg.load("pool", f"0 {thin.data_sectors} thin-pool /dev/mapper/meta "
                               f"/dev/data {BLOCK} 0")
        await reg.resume("pool")
        fields = pool_fields(reg)
        assert fields[4] == "rw" and fields[1].endswith("/1024")
        await reg.message("pool", 0, ["create_thin", str(made)])
        await teardown(reg)

    run(go())
    assert thin.dump().count("<device ") >= 60
