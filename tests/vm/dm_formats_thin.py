"""dm-thin's part of the format oracle (test_dm_formats.py, guest/dm_formats_thin.sh).

Before the boot, `prepare` makes a pool with minidisk (two thins, a snapshot that shares
and breaks sharing, a transaction id) in files the guest's dm-thin-pool then loads over
loop devices: it must read the same bytes (sha256 of every thin) and show the same status.
The guest then writes into our pool with the kernel, and makes a pool of its own; after
the boot, `thin_check` judges both metadata files and minidisk opens them and must read
what the kernel read (`open_pool`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.dm import DeviceDict, Registry

SECTOR = 512
BLOCK = 128  # sectors per data block (64 KiB)
BB = BLOCK * SECTOR
META_SIZE = 2 << 20
DATA_SIZE = 4 << 20  # small: every byte crosses 9p and TCG
THIN_SECTORS = 4096  # 2 MiB thins
PATTERN_SIZE = 256 << 10


@dataclass(frozen=True)
class Prepared:
    sums: dict[int, str]  # thin id -> sha256 of its THIN_SECTORS
    statuses: dict[str, str]  # "pool" / thin id -> our status text


def pattern() -> bytes:
    return hashlib.shake_256(b"dm_formats_thin").digest(PATTERN_SIZE)


async def _read_all(dev: BlockDevice) -> str:
    buf = bytearray(THIN_SECTORS * SECTOR)
    await dev.pread(memoryview(buf), 0)
    return hashlib.sha256(buf).hexdigest()


async def open_pool(meta: Path, data: Path, ids: list[int]) -> Prepared:
    """Load a pool from the files and read every thin whole; then tear it down."""
    fds = [FileDevice(str(meta)), FileDevice(str(data))]
    ns = DeviceDict({"/dev/meta": fds[0], "/dev/data": fds[1]})
    reg = Registry(ns, ns)
    try:
        await reg.create("pool", f"0 {DATA_SIZE // SECTOR} thin-pool /dev/meta /dev/data "
                                 f"{BLOCK} 0")
        sums, statuses = {}, {}
        for i in ids:
            dev = await reg.create(f"t{i}", f"0 {THIN_SECTORS} thin /dev/mapper/pool {i}")
            sums[i] = await _read_all(dev)
            statuses[str(i)] = reg.status(f"t{i}")[0][3]
        statuses["pool"] = reg.status("pool")[0][3]
        for i in ids:
            await reg.remove(f"t{i}")
        await reg.remove("pool")
    finally:
        for f in fds:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
    return Prepared(sums, statuses)


async def _make_ours(meta: Path, data: Path) -> None:
    pat = pattern()
    fds = [FileDevice(str(meta)), FileDevice(str(data))]
    ns = DeviceDict({"/dev/meta": fds[0], "/dev/data": fds[1]})
    reg = Registry(ns, ns)
    await reg.create("pool", f"0 {DATA_SIZE // SECTOR} thin-pool /dev/meta /dev/data {BLOCK} 0")
    await reg.message("pool", 0, ["create_thin", "1"])
    t1 = await reg.create("t1", f"0 {THIN_SECTORS} thin /dev/mapper/pool 1")
    await t1.pwrite(memoryview(bytearray(pat[:4 * BB])), 0)  # blocks 0-3
    await t1.pwrite(memoryview(bytearray(pat[:4096])), 12 * BB + 8192)  # zero-filled
    await reg.suspend("t1")
    await reg.message("pool", 0, ["create_snap", "2", "1"])
    await reg.resume("t1")
    t2 = await reg.create("t2", f"0 {THIN_SECTORS} thin /dev/mapper/pool 2")
    await t2.pwrite(memoryview(bytearray(pat[BB:BB + 4096])), BB + 4096)  # breaks sharing
    await t1.pwrite(memoryview(bytearray(pat[-BB:])), 30 * BB)
    await reg.message("pool", 0, ["set_transaction_id", "0", "1"])
    await reg.remove("t2")
    await reg.remove("t1")
    await reg.remove("pool")
    for f in fds:
        os.close(f.fd)
        f.fd = -1


def prepare(directory: Path) -> Prepared:
    directory.mkdir(parents=True)
    meta, data = directory / "ours_meta.img", directory / "ours_data.img"
    for path, size in ((meta, META_SIZE), (data, DATA_SIZE)):
        with open(path, "wb") as f:
            f.truncate(size)
    (directory / "pattern").write_bytes(pattern())
    (directory / "data_sectors").write_text(f"{DATA_SIZE // SECTOR}\n")
    (directory / "thin_sectors").write_text(f"{THIN_SECTORS}\n")
    asyncio.run(_make_ours(meta, data))
    thin_check(meta)
    prepared = asyncio.run(open_pool(meta, data, [1, 2]))
    # What the kernel must read and show for our pool: the fragment checks it itself, so
    # that the boot's every-fragment-finished test already fails on a difference.
    for i, digest in prepared.sums.items():
        (directory / f"expected.{i}.sha").write_text(f"{digest}\n")
    for key, text in prepared.statuses.items():
        (directory / f"expected.{key}.status").write_text(f"{text}\n")
    return prepared


def after_boot(out: Path, prepared: Prepared, scratch: Path) -> list[str]:
    """Every difference the host finds after the boot: the kernel's reading of our pool,
    then both files the kernel left (ours written into, its own) checked by thin_check and
    read by minidisk against what the kernel read from them."""
    wrong = []
    sums, statuses = kernel_rows(out, "ours")
    if sums != prepared.sums:
        wrong.append(f"the kernel read other bytes from our pool: {sums} vs {prepared.sums}")
    wrong += status_differences(prepared.statuses, statuses)
    for prefix, rows, ids in (("ours", "ours_after", [1, 2]), ("kernel", "kernel", [1, 7])):
        meta, data = scratch / f"{prefix}_meta.img", scratch / f"{prefix}_data.img"
        meta.write_bytes((out / meta.name).read_bytes())
        data.write_bytes((out / data.name).read_bytes())
        try:
            thin_check(meta)
        except AssertionError as e:
            wrong.append(str(e))
            continue
        kernel_sums, kernel_statuses = kernel_rows(out, rows)
        ours = asyncio.run(open_pool(meta, data, ids))
        if ours.sums != kernel_sums:
            wrong.append(f"{prefix}: we read {ours.sums}, the kernel {kernel_sums}")
        wrong += [f"{prefix}: {d}" for d in status_differences(ours.statuses, kernel_statuses)]
    if kernel_rows(out, "ours_after")[0].get(1) != prepared.sums.get(1):
        wrong.append("the kernel's write to thin 2 changed thin 1")
    return wrong


def thin_check(meta: Path) -> None:
    done = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        raise AssertionError(f"thin_check {meta}: {done.stdout}{done.stderr}")


def kernel_rows(out: Path, prefix: str) -> tuple[dict[int, str], dict[str, str]]:
    """The sums and statuses the guest left for `prefix` (ours, ours_after, kernel)."""
    sums = {int(p.name.split(".")[1]): p.read_text().strip()
            for p in out.glob(f"{prefix}.*.sha")}
    statuses = {p.name.split(".")[1]: p.read_text().split(None, 3)[3].strip()
                for p in out.glob(f"{prefix}.*.status")}
    return sums, statuses


def status_differences(ours: dict[str, str], kernel: dict[str, str]) -> list[str]:
    """Statuses compared word for word (both sides read the same committed metadata)."""
    out = []
    for key in sorted(set(ours) | set(kernel)):
        if ours.get(key, "").split() != kernel.get(key, "").split():
            out.append(f"{key}: minidisk {ours.get(key)!r}, kernel {kernel.get(key)!r}")
    return out
