"""dm-thin's metadata format against Debian's thin-provisioning-tools, both ways.

Ours -> tools: metadata we write (big enough for multi-level btrees, snapshots sharing
nodes and data blocks, deletions that merge nodes) passes `thin_check`, and `thin_dump`
shows exactly the mappings we made; `thin_dump | thin_restore | thin_dump` is the
identity. Tools -> ours: metadata `thin_restore` wrote from an XML we made up is loaded
by our pool, and each thin reads the data blocks the XML maps.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

from tests.dm.dm_helpers import SECTOR, pattern, read, run, write
from tests.dm.test_thin import BB, BLOCK, MB, ThinSetup, teardown

from minidisk.device.file import FileDevice
from minidisk.dm.thin.metadata import PoolMetadata


def dump(meta: Path) -> str:
    return subprocess.run(["thin_dump", str(meta)], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def check(meta: Path) -> None:
    done = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def mappings(xml: str) -> dict[int, dict[int, int]]:
    """dev id -> {virtual block: data block}, from thin_dump's XML (ranges expanded)."""
    out: dict[int, dict[int, int]] = {}
    dev = -1
    for line in xml.splitlines():
        if m := re.search(r'<device dev_id="(\d+)"', line):
            dev = int(m[1])
            out[dev] = {}
        elif m := re.search(r'<single_mapping origin_block="(\d+)" data_block="(\d+)"', line):
            out[dev][int(m[1])] = int(m[2])
        elif m := re.search(r'<range_mapping origin_begin="(\d+)" data_begin="(\d+)" '
                            r'length="(\d+)"', line):
            for i in range(int(m[3])):
                out[dev][int(m[1]) + i] = int(m[2]) + i
    return out


def make_metadata(meta: Path, seed: int) -> dict[int, dict[int, int]]:
    """Write a pool's metadata with PoolMetadata directly; return what it should hold."""
    rng = random.Random(seed)
    expect: dict[int, dict[int, int]] = {}

    async def go() -> None:
        dev = FileDevice(str(meta))
        md = PoolMetadata(dev, BLOCK)
        await md.open()
        md.resize_data(40000)
        await md.create_thin(1)
        expect[1] = {}
        for v in rng.sample(range(100000), 6000):  # leaves of up to 252 under an internal root
            b = md.alloc_data_block()
            await md.insert_block(1, v, b)
            expect[1][v] = b
        await md.commit()
        for snap in (2, 3, 4):
            await md.create_snap(snap, 1)
            expect[snap] = dict(expect[1])
        await md.commit()
        # Writes to shared blocks move them (break sharing), as the pool does.
        for snap in (2, 3):
            for v in rng.sample(sorted(expect[snap]), 500):
                found = await md.find_block(snap, v)
                assert found is not None and found[1]
                b = md.alloc_data_block()
                await md.insert_block(snap, v, b)
                expect[snap][v] = b
        # Removals (discards) deep enough to merge and even out nodes.
        for v in rng.sample(sorted(expect[4]), 5000):
            assert await md.remove_block(4, v)
            del expect[4][v]
        await md.commit()
        await md.delete(3)
        del expect[3]
        await md.create_snap(5, 2)
        expect[5] = dict(expect[2])
        md.set_transaction_id(0, 42)
        await md.commit()
        os.close(dev.fd)

    run(go(), timeout=300)
    return expect


def test_our_metadata_passes_thin_check_and_dumps_what_we_mapped(tmp_path: Path) -> None:
    meta = tmp_path / "meta.img"
    with open(meta, "wb") as f:
        f.truncate(16 * MB)
    expect = make_metadata(meta, 1)
    check(meta)
    xml = dump(meta)
    assert mappings(xml) == expect
    assert 'transaction="42"' in xml
    assert re.search(r'<device dev_id="4" mapped_blocks="1000"', xml)


def test_dump_restore_dump_is_the_identity(tmp_path: Path) -> None:
    meta, restored = tmp_path / "meta.img", tmp_path / "restored.img"
    for p in (meta, restored):
        with open(p, "wb") as f:
            f.truncate(16 * MB)
    make_metadata(meta, 2)
    xml = dump(meta)
    (tmp_path / "dump.xml").write_text(xml)
    subprocess.run(["thin_restore", "-i", str(tmp_path / "dump.xml"), "-o", str(restored)],
                   check=True, capture_output=True, timeout=120)
    assert dump(restored) == xml


def test_we_load_metadata_thin_restore_wrote(tmp_path: Path) -> None:
    """An XML with ranges, singles, and two devices sharing data blocks; restored by the
    tools; our pool reads what it says and writes as a pool should on top of it."""
    thin = ThinSetup(tmp_path, data_mb=16)
    xml = f"""<superblock uuid="" time="1" transaction="7" flags="0" version="2" \
data_block_size="{BLOCK}" nr_data_blocks="256">
  <device dev_id="3" mapped_blocks="12" transaction="5" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="10" time="0"/>
    <single_mapping origin_block="500" data_block="40" time="0"/>
    <single_mapping origin_block="501" data_block="41" time="1"/>
  </device>
  <device dev_id="9" mapped_blocks="10" transaction="6" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="10" length="10" time="0"/>
  </device>
</superblock>
"""
    (tmp_path / "in.xml").write_text(xml)
    subprocess.run(["thin_restore", "-i", str(tmp_path / "in.xml"), "-o", str(thin.meta)],
                   check=True, capture_output=True, timeout=60)
    with open(thin.data, "r+b") as f:
        for b in (*range(10, 20), 40, 41):
            f.seek(b * BB)
            f.write(pattern(b, BB))
    reg = thin.registry()

    async def go() -> None:
        await reg.create("pool", thin.pool_table())
        (_, _, _, status), = reg.status("pool")
        assert status.split()[0] == "7" and status.split()[2] == "12/256"
        t3 = await reg.create("t3", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 3")
        t9 = await reg.create("t9", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 9")
        for v in range(10):
            assert await read(t3, v * BB, BB) == pattern(10 + v, BB)
            assert await read(t9, v * BB, BB) == pattern(10 + v, BB)
        assert await read(t3, 500 * BB, 2 * BB) == pattern(40, BB) + pattern(41, BB)
        assert await read(t3, 502 * BB, BB) == bytes(BB)
        assert reg.status("t3")[0][3] == f"{12 * BLOCK} {502 * BLOCK - 1}"
        # Shared (time 0 < snap_time 1): a write moves it; 501 (time 1) is written in place.
        await write(t9, 2 * BB, b"n" * 4096)
        await write(t3, 501 * BB, b"p" * 4096)
        assert await read(t3, 2 * BB, BB) == pattern(12, BB)
        assert await read(t9, 2 * BB, 4096) == b"n" * 4096
        (_, _, _, status), = reg.status("pool")
        assert status.split()[2] == "13/256"
        await teardown(reg)

    run(go())
    thin.close()
    check(thin.meta)
    got = mappings(dump(thin.meta))
    assert got[3] == {**{v: 10 + v for v in range(10)}, 500: 40, 501: 41}
    assert got[9][2] not in range(10, 20) and len(got[9]) == 10
