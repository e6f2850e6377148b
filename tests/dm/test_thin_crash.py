"""Crash consistency of a thin pool, with log-writes as the recorder (dmtest's crash idea).

The pool's metadata and data devices are two linear windows of one log-writes device, so
the log holds every write to both in the order it became stable. The log is replayed to
every flush point: at each, `thin_check` must find the metadata clean, and at each mark
(laid after a FLUSH to the thin returned) every write acknowledged before must read back.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import subprocess
from pathlib import Path

from tests.dm.dm_helpers import SECTOR, pattern, read, registry_over, run, write

from minidisk.cli import replaylog
from minidisk.device.file import FileDevice
from minidisk.device.memory import MemoryDevice
from minidisk.dm import DeviceDict

MB = 1 << 20
META, DATA = 4 * MB, 16 * MB
BLOCK = 128
BB = BLOCK * SECTOR


def replay(*argv: str) -> str:
    out = io.StringIO()
    assert replaylog.main(list(argv), out=out) == 0
    return out.getvalue()


def split(image: Path, meta: Path, data: Path) -> None:
    raw = image.read_bytes()
    meta.write_bytes(raw[:META])
    data.write_bytes(raw[META:])


def test_every_flush_point_is_consistent_and_keeps_acknowledged_writes(
        tmp_path: Path) -> None:
    disk, log = MemoryDevice(META + DATA), MemoryDevice(64 * MB)
    ns = DeviceDict({"/dev/disk": disk, "/dev/log": log})
    reg = registry_over(ns)
    acked: dict[str, list[tuple[int, int, bytes]]] = {}  # mark -> (thin, offset, data)

    async def go() -> None:
        rng = random.Random(3)
        await reg.create("lw", f"0 {(META + DATA) // SECTOR} log-writes /dev/disk /dev/log")
        await reg.create("meta", f"0 {META // SECTOR} linear /dev/mapper/lw 0")
        await reg.create("data", f"0 {DATA // SECTOR} linear /dev/mapper/lw {META // SECTOR}")
        await reg.create("pool", f"0 {DATA // SECTOR} thin-pool /dev/mapper/meta "
                                 f"/dev/mapper/data {BLOCK} 0")
        await reg.message("pool", 0, ["create_thin", "1"])
        thins = {1: await reg.create("t1", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool 1")}
        done: list[tuple[int, int, bytes]] = []
        vblocks = rng.sample(range(1000), 120)
        for m in range(6):
            if m == 3:
                await reg.suspend("t1")
                await reg.message("pool", 0, ["create_snap", "2", "1"])
                await reg.resume("t1")
                thins[2] = await reg.create("t2", f"0 {64 * MB // SECTOR} thin "
                                                  f"/dev/mapper/pool 2")
            for i in range(20):
                tid = rng.choice(sorted(thins))
                v = vblocks.pop()
                length = rng.choice((4096, 8192, BB))
                offset = v * BB + rng.randrange(0, BB - length + 1, 4096)
                data = pattern(m * 100 + i, length)
                await write(thins[tid], offset, data)
                done.append((tid, offset, data))
                if i % 7 == 6:
                    await asyncio.sleep(0)  # let the commit ticker run when it is due
            await thins[1].flush()
            await reg.message("lw", 0, ["mark", f"m{m}"])
            acked[f"m{m}"] = list(done)
        for name in ("t2", "t1", "pool", "data", "meta", "lw"):
            await reg.remove(name)
        buf = bytearray(log.size)
        await log.pread(memoryview(buf), 0)
        (tmp_path / "log").write_bytes(bytes(buf))

    run(go(), timeout=120)
    logfile, image = tmp_path / "log", tmp_path / "image"
    meta, data = tmp_path / "meta.img", tmp_path / "data.img"

    # Every flush entry of the log: the metadata replayed to there is clean.
    entries = int(replay("--log", str(logfile), "--num-entries"))
    flushes = []
    start = 0
    while True:
        out = io.StringIO()
        status = replaylog.main(["--log", str(logfile), "--find", "--next-flush",
                                 "--start-entry", str(start)], out=out)
        if status:
            break
        entry = int(out.getvalue().split("@")[0])
        flushes.append(entry)
        start = entry + 1
    assert len(flushes) >= 12 and flushes[-1] < entries
    formatted = False
    for entry in flushes:
        with open(image, "wb") as f:
            f.truncate(META + DATA)
        replay("--log", str(logfile), "--replay", str(image), "--limit", str(entry + 1))
        split(image, meta, data)
        if not any(meta.read_bytes()[:4096]):
            assert not formatted, f"superblock gone at entry {entry}"
            continue  # before the pool's first commit
        formatted = True
        check = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True)
        assert check.returncode == 0, f"entry {entry}: {check.stderr}"
    assert formatted

    # Every mark: the acknowledged writes read back through a pool over the replayed files.
    for mark, writes in acked.items():
        with open(image, "wb") as f:
            f.truncate(META + DATA)
        replay("--log", str(logfile), "--replay", str(image), "--end-mark", mark)
        split(image, meta, data)
        assert asyncio.run(_read_back(meta, data, writes)) == [], mark


async def _read_back(meta: Path, data: Path, writes: list[tuple[int, int, bytes]]) -> list[str]:
    files = [FileDevice(str(meta)), FileDevice(str(data))]
    ns = DeviceDict({"/dev/meta": files[0], "/dev/data": files[1]})
    reg = registry_over(ns)
    wrong = []
    try:
        await reg.create("pool", f"0 {DATA // SECTOR} thin-pool /dev/meta /dev/data {BLOCK} 0")
        ids = sorted({t for t, _, _ in writes})
        devs = {t: await reg.create(f"t{t}", f"0 {64 * MB // SECTOR} thin /dev/mapper/pool {t}")
                for t in ids}
        for t, offset, expected in writes:
            if await read(devs[t], offset, len(expected)) != expected:
                wrong.append(f"thin {t} at {offset}")
        for t in ids:
            await reg.remove(f"t{t}")
        await reg.remove("pool")
    finally:
        for f in files:
            os.close(f.fd)
            f.fd = -1
    return wrong
