"""log-writes: what is logged, in which order, in the kernel's format; replay to any mark."""

from __future__ import annotations

import io
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.dm.dm_helpers import SECTOR, memory_namespace, pattern, read, registry_over, run, write
from tests.harness import MINIDISK

from minidisk.cli import replaylog
from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.dm import DeviceDict, Registry, writelog

DATA = 1 << 20
LOG = 8 << 20


def decode_log(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """The log read straight from bytes with the kernel's structs: no code under test."""
    magic, version, nr, sectorsize = struct.unpack_from("<QQQI", raw, 0)
    assert (magic, version, sectorsize) == (0x6A736677736872, 1, 512)
    out = []
    pos = 512
    for _ in range(nr):
        sector, count, flags, data_len = struct.unpack_from("<QQQQ", raw, pos)
        extra = raw[pos + 32:pos + 32 + data_len] if flags & 8 else b""
        out.append((sector, count, flags, extra))
        pos += 512 + (0 if flags & (4 | 8) else count * 512)
    return out


async def snapshot(dev: BlockDevice) -> bytes:
    return await read(dev, 0, dev.size)


async def logged(log: BlockDevice) -> list[tuple[int, int]]:
    """(sector, flags) of each entry in the log."""
    return [(sector, flags) for sector, _, flags, _ in decode_log(await snapshot(log))]


def replay_log(*argv: str) -> tuple[int, str]:
    """`minidisk replay-log ARGV` in this process: its exit status and stdout."""
    out = io.StringIO()
    status = replaylog.main(list(argv), out=out)
    return status, out.getvalue()


def test_writes_are_logged_at_the_next_flush_and_marks_at_once() -> None:
    ns = memory_namespace(data=DATA, log=LOG)
    reg = registry_over(ns)
    log = ns.devices["/dev/log"]

    async def go() -> None:
        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        await write(dev, 0, pattern(1, 2 * SECTOR))
        await reg.message("lw", 0, ["mark", "before-flush"])
        await dev.flush()
        await write(dev, 8 * SECTOR, pattern(2, SECTOR), fua=True)  # logged at completion
        await dev.trim(16 * SECTOR, 4 * SECTOR)
        await reg.message("lw", 0, ["mark", "after"])
        assert reg.status("lw") == [(0, DATA // SECTOR, "log-writes", "5 8")]  # 9 log sectors used
        return None

    run(go())
    raw = bytes(run(read(log, 0, 64 * SECTOR)))
    entries = decode_log(raw)
    # the unflushed write comes after the mark, with its flush; the trim is not yet flushed
    assert entries == [
        (0, 0, 8, b"before-flush"),
        (0, 2, 0, b""),
        (0, 0, 1, b""),
        (8, 1, 2, b""),
        (0, 0, 8, b"after"),
    ]
    # super, mark, write header + 2 data, flush, FUA header + 1 data, mark
    assert raw[3 * 512:5 * 512] == pattern(1, 2 * SECTOR)
    assert raw[7 * 512:8 * 512] == pattern(2, SECTOR)


def test_entries_are_in_completion_order() -> None:
    """A slow write issued first is logged after a fast one issued later."""
    ns = memory_namespace(a=DATA, log=LOG)
    reg = registry_over(ns)
    half = DATA // SECTOR // 2

    async def go() -> None:
        await reg.create("under", f"0 {half} delay /dev/a 0 100\n{half} {half} linear /dev/a "
                                  f"{half}")
        import asyncio

        dev = await reg.create("lw", f"0 {2 * half} log-writes /dev/mapper/under /dev/log")
        slow = asyncio.ensure_future(write(dev, 0, pattern(1, SECTOR)))
        await asyncio.sleep(0.01)
        await write(dev, half * SECTOR, pattern(2, SECTOR))
        await slow
        await dev.flush()
        assert await logged(ns.devices["/dev/log"]) == [(half, 0), (0, 0), (0, writelog.FLUSH)]

    run(go())


def test_replay_reproduces_the_device_at_every_mark(tmp_path: Path) -> None:
    ns = memory_namespace(data=DATA, log=LOG)
    reg = registry_over(ns)
    data = ns.devices["/dev/data"]
    snapshots: dict[str, bytes] = {}
    log_path, target = tmp_path / "log", tmp_path / "replay"

    async def go() -> None:
        import random

        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        rng = random.Random(5)
        for m in range(6):
            for i in range(20):
                sector = rng.randrange(DATA // SECTOR - 16)
                count = rng.randrange(1, 16)
                fua = rng.random() < 0.2
                if fua:
                    # PREFLUSH + FUA, as a file system commits: FUA alone is no barrier
                    # (see test_fua_is_not_a_barrier)
                    await dev.flush()
                await write(dev, sector * SECTOR, pattern(m * 100 + i, count * SECTOR), fua)
            if m % 2:
                await dev.zero(rng.randrange(64) * SECTOR, 32 * SECTOR)
                await dev.trim(rng.randrange(64, 128) * SECTOR, 8 * SECTOR)
            await dev.flush()
            await reg.message("lw", 0, ["mark", f"m{m}"])
            snapshots[f"m{m}"] = await snapshot(data)
        log_path.write_bytes(await snapshot(ns.devices["/dev/log"]))

    run(go())
    for mark, expected in snapshots.items():
        target.write_bytes(bytes(DATA))
        assert replay_log("--log", str(log_path), "--replay", str(target), "--end-mark",
                          mark) == (0, "")
        assert target.read_bytes() == expected, mark
    # a mark that is not in the log replays all of it, as xfstests' replay-log does
    target.write_bytes(bytes(DATA))
    assert replay_log("--log", str(log_path), "--replay", str(target), "--end-mark",
                      "nope") == (0, "")
    assert target.read_bytes() == snapshots["m5"]
    # --limit N replays exactly N entries: up to m0's entry is m0's state
    status, found = replay_log("--log", str(log_path), "--find", "--end-mark", "m0")
    assert status == 0
    m0 = int(found.split("@")[0])
    target.write_bytes(bytes(DATA))
    assert replay_log("--log", str(log_path), "--replay", str(target), "--limit",
                      str(m0 + 1)) == (0, "")
    assert target.read_bytes() == snapshots["m0"]


def test_fua_is_not_a_barrier() -> None:
    """A FUA write is logged when it completes, ahead of earlier writes not yet flushed."""
    ns = memory_namespace(data=DATA, log=LOG)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        await write(dev, 0, pattern(1, SECTOR))
        await write(dev, 0, pattern(2, SECTOR), fua=True)
        await dev.flush()
        assert await logged(ns.devices["/dev/log"]) == [(0, writelog.FUA), (0, 0),
                                                        (0, writelog.FLUSH)]

    run(go())


def test_removing_the_device_logs_pending_writes_and_an_end_mark() -> None:
    ns = memory_namespace(data=DATA, log=LOG)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        await write(dev, 0, pattern(1, SECTOR))  # never flushed
        await reg.remove("lw")
        entries = decode_log(await snapshot(ns.devices["/dev/log"]))
        assert [(sector, flags, text) for sector, _, flags, text in entries] == \
            [(0, 0, b""), (0, writelog.MARK, writelog.END_MARK.encode())]

    run(go())


def test_a_full_log_stops_logging_but_not_io() -> None:
    ns = memory_namespace(data=DATA, log=8 * SECTOR)
    reg = registry_over(ns)

    async def go() -> None:
        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        for i in range(4):
            await write(dev, i * 4 * SECTOR, pattern(i, 4 * SECTOR), fua=True)
        assert await read(dev, 12 * SECTOR, 4 * SECTOR) == pattern(3, 4 * SECTOR)
        assert reg.status("lw")[0][3].split()[0] == "1"  # only the first fitted

    run(go())


def test_replay_log_command_on_host_files(
    tmp_path: Path, file_devices: Callable[..., FileDevice],
) -> None:
    data_path, log_path = tmp_path / "data", tmp_path / "log"
    data_path.write_bytes(bytes(DATA))
    log_path.write_bytes(bytes(LOG))
    ns = DeviceDict({"/dev/data": file_devices(data_path), "/dev/log": file_devices(log_path)})
    reg = Registry(ns, ns)
    snapshots: dict[str, bytes] = {}

    async def go() -> None:
        dev = await reg.create("lw", f"0 {DATA // SECTOR} log-writes /dev/data /dev/log")
        for m in range(3):
            await write(dev, m * 3 * SECTOR + 5 * SECTOR, pattern(m, 7 * SECTOR))
            await dev.flush()
            await reg.message("lw", 0, ["mark", f"step {m}"])
            snapshots[f"step {m}"] = data_path.read_bytes()

    run(go())
    target = tmp_path / "replay"
    for mark, expected in snapshots.items():
        target.write_bytes(bytes(DATA))
        subprocess.run([MINIDISK, "replay-log", "--log", str(log_path), "--replay", str(target),
                        "--end-mark", mark], check=True, timeout=60)
        assert target.read_bytes() == expected, mark
    found = subprocess.run([MINIDISK, "replay-log", "--log", str(log_path), "--find",
                            "--end-mark", "step 1"], check=True, capture_output=True, text=True)
    # write, flush, mark, write, flush, *mark*: entry 5, and the next one starts at block
    # 21 (super; 1 + 7 for each write, 1 for each flush and mark)
    assert found.stdout == "5@21\n"
    count = subprocess.run([MINIDISK, "replay-log", "--log", str(log_path), "--num-entries"],
                           check=True, capture_output=True, text=True)
    assert count.stdout.strip() == "9"
