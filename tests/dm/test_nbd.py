"""End to end: `minidisk serve --table`, `minidisk dmsetup`, and NBD clients (nbdcopy,
qemu-io, fio, libnbd) against mapped devices, checked in the backing host files."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.dm.dm_helpers import SECTOR, Server, pattern
from tests.dm.test_placement import kernel_stripe_map
from tests.harness import MINIDISK, SYSTEM_PYTHON

from minidisk.control_client import call

pytestmark = pytest.mark.slow


def qemu_io(uri: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True,
                          text=True, timeout=timeout)


def fio_json(output: str) -> dict[str, Any]:
    """fio's JSON report (the nbd engine prints a line of its own before it)."""
    result: dict[str, Any] = json.loads(output[output.index("{"):])
    return result


def fio(uri: str, *options: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}",
                           "--output-format=json", *options],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("stripes,chunk", [(2, 8), (3, 24), (4, 128)])
def test_striped_placement_through_nbd(
    stripes: int, chunk: int, tmp_path: Path, serve: Callable[..., Server],
) -> None:
    width = chunk * 64
    length = width * stripes
    files = []
    for i in range(stripes):
        f = tmp_path / f"h{i}.img"
        f.write_bytes(bytes((width + 100) * SECTOR))
        files.append(f)
    starts = [2 * i + 1 for i in range(stripes)]  # odd sector offsets
    table = tmp_path / "t.table"
    table.write_text(f"0 {length} striped {stripes} {chunk} " +
                     " ".join(f"/dev/h{i} {starts[i]}" for i in range(stripes)) + "\n")
    server = serve(*[f"--file=/dev/h{i}={f}" for i, f in enumerate(files)],
                   f"--table=st={table}")
    source = tmp_path / "src.img"
    data = pattern(stripes * 31 + chunk, length * SECTOR)
    source.write_bytes(data)
    subprocess.run(["nbdcopy", str(source), server.uri("/dev/mapper/st")], check=True,
                   timeout=60)
    raw = [f.read_bytes() for f in files]
    for sector in range(length):
        stripe, at = kernel_stripe_map(sector, stripes, chunk)
        where = (starts[stripe] + at) * SECTOR
        assert raw[stripe][where:where + SECTOR] == data[sector * SECTOR:(sector + 1) * SECTOR]


def test_dmsetup_lifecycle_and_output(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=16M", "--memory=/dev/b=16M")
    server.dmsetup("create", "low", stdin="0 1000 linear /dev/a 24\n")
    server.dmsetup("create", "top", "--table", "0 1000 linear /dev/mapper/low 0")
    server.dmsetup("create", "spare", "--notable")
    assert server.dmsetup("ls").stdout == "low\t(253:0)\nspare\t(253:2)\ntop\t(253:1)\n"
    info = server.dmsetup("info", "low").stdout
    assert "State:             ACTIVE\n" in info and "Open count:        1\n" in info
    assert "Tables present:    LIVE\n" in info and info.endswith("\n\n")
    assert server.dmsetup("info", "spare").stdout.count("Tables present:    None") == 1
    assert server.dmsetup("deps", "top").stdout == "1 dependencies\t: (253, 0)\n"
    assert server.dmsetup("deps", "-o", "devname", "top").stdout == \
        "1 dependencies\t: (low)\n"
    tree = server.dmsetup("ls", "--tree").stdout.splitlines()
    assert tree[-3:] == ["top (253:1)", " └─low (253:0)", "    └─ (240:0)"]  # the key's number
    # table output loads back unchanged, through the CLI
    printed = server.dmsetup("table", "top").stdout
    server.dmsetup("load", "spare", stdin=printed)
    server.dmsetup("resume", "spare")
    assert server.dmsetup("table", "spare").stdout == printed
    assert server.dmsetup("table").stdout.splitlines()[0] == "low: 0 1000 linear 240:0 24"
    # a bad table: one line saying which segment and why, and nothing changes
    bad = server.dmsetup("load", "top", "--table", "0 1000 linear /dev/a 99999",
                         check=False)
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    # dmsetup's words only; the reason goes to the server's log, as the kernel's to its log
    assert lines == ["device-mapper: reload ioctl on top  failed: Invalid argument",
                     "Command failed."]
    assert "line 1 ('0 1000 linear /dev/a 99999'): linear: device /dev/a too small" in \
        server.log.read_text()
    assert "Tables present:    LIVE\n" in server.dmsetup("info", "top").stdout
    # remove refuses an open device; -f swaps in an error table first
    busy = server.dmsetup("remove", "low", check=False)
    assert busy.returncode == 1 and "Device or resource busy" in busy.stderr
    server.dmsetup("rename", "spare", "spare2")
    server.dmsetup("remove", "spare2", "top", "low")
    assert server.dmsetup("ls").stdout == "No devices found\n"
    missing = server.dmsetup("info", "low", check=False)
    assert missing.returncode == 1 and "Device does not exist." in missing.stderr


def test_message_wait_and_status_through_the_cli(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=16M")
    server.dmsetup("create", "dust", "--table", "0 1024 dust /dev/a 0 4096")
    assert server.dmsetup("message", "dust", "0", "addbadblock", "2").stdout == ""
    assert server.dmsetup("message", "dust", "0", "queryblock", "2").stdout == \
        "dust_query_block: block 2 found in badblocklist\n"
    # dmsetup joins its words and the kernel splits them again: one quoted argument is two
    assert server.dmsetup("message", "dust", "0", "queryblock 2").stdout == \
        "dust_query_block: block 2 found in badblocklist\n"
    trailing = server.dmsetup("message", "dust", "0", "queryblock 2\\", check=False)
    assert trailing.returncode == 1 and "backslash at end of line" in trailing.stderr
    server.dmsetup("message", "dust", "0", "enable")
    assert server.dmsetup("status", "dust").stdout == \
        "0 1024 dust 240:0 fail_read_on_bad_block verbose\n"
    uri = server.uri("/dev/mapper/dust")
    bad_read = qemu_io(uri, "read 8192 4096")
    assert "read failed: Input/output error" in bad_read.stdout + bad_read.stderr
    assert "read 4096/4096" in qemu_io(uri, "read 0 4096").stdout
    # wait -v returns when a target raises an event (a failing stripe)
    server.dmsetup("create", "bad", "--table", "0 64 error")
    server.dmsetup("create", "s", "--table", "0 128 striped 2 8 /dev/a 0 /dev/mapper/bad 0")
    waiter = subprocess.Popen([MINIDISK, "dmsetup", "--server", server.url, "wait", "-v", "s",
                               "0"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert waiter.poll() is None
    qemu_io(server.uri("/dev/mapper/s"), "read 4096 512")  # chunk 1: the error stripe
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and "Event number:      1\n" in out
    assert server.dmsetup("status", "s").stdout.endswith(" 1 AD\n")


def test_suspended_device_blocks_nbd_io_until_resume(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=16M")
    server.dmsetup("create", "d", "--table", "0 2048 linear /dev/a 0")
    server.dmsetup("suspend", "d")
    assert "State:             SUSPENDED" in server.dmsetup("info", "d").stdout
    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4096",
                               server.uri("/dev/mapper/d")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    assert reader.poll() is None  # waiting, not failed
    server.dmsetup("load", "d", "--table", "0 2048 linear /dev/a 8")
    server.dmsetup("resume", "d")
    out, _ = reader.communicate(timeout=30)
    assert reader.returncode == 0 and "wrote 4096/4096" in out
    # the queued write went to the new table: 8 sectors into /dev/a
    check = qemu_io(server.uri("/dev/a"), "read -P 0x5a 4096 4096")
    assert "read 4096/4096" in check.stdout and "Pattern verification failed" not in check.stdout


def test_reloads_under_fio_load_lose_no_acknowledged_write(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=64M")
    sectors = (32 << 20) // SECTOR
    tables = [f"0 {sectors} linear /dev/a 0",
              f"0 {sectors // 2} linear /dev/a 0\n{sectors // 2} {sectors // 2} linear /dev/a "
              f"{sectors // 2}"]
    server.dmsetup("create", "d", "--table", tables[0])
    job = subprocess.Popen(
        ["fio", "--name=stomp", "--ioengine=nbd", f"--uri={server.uri('/dev/mapper/d')}",
         "--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=8", "--verify=crc32c",
         # Writes paced to ~4 s, so the reload count does not depend on machine speed.
         "--rate_iops=,2000",
         "--verify_fatal=1", "--randrepeat=1", "--output-format=json",
         "--verify_state_save=0"],  # no state file left in the working directory
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The reload loop talks to the control channel directly (the CLI's start-up time would
    # leave fio few reloads to run into); one cycle in the middle goes through the CLI.
    reloads = 0
    while job.poll() is None:
        time.sleep(0.02)
        if reloads == 3:
            server.dmsetup("suspend", "d")
            server.dmsetup("load", "d", stdin=tables[(reloads + 1) % 2])
            server.dmsetup("resume", "d")
        else:
            call(server.url, "dm.suspend", {"name": "d", "noflush": reloads % 2 == 1})
            call(server.url, "dm.load", {"name": "d", "table": tables[(reloads + 1) % 2]})
            call(server.url, "dm.resume", {"name": "d"})
        reloads += 1
    out, err = job.communicate()
    assert job.returncode == 0, f"after {reloads} reloads: {err}"
    result = fio_json(out)["jobs"][0]
    assert result["error"] == 0 and result["write"]["io_bytes"] == 32 << 20
    assert result["read"]["io_bytes"] == 32 << 20  # the verify pass read everything back
    assert reloads >= 10


def test_targets_under_fio(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=16M")
    server.dmsetup("create", "err", "--table", "0 2048 error")
    server.dmsetup("create", "slow", "--table", "0 2048 delay /dev/a 0 50")
    server.dmsetup("create", "drop", "--table", "0 2048 flakey /dev/a 0 0 60 1 drop_writes")
    failed = fio(server.uri("/dev/mapper/err"), "--rw=read", "--bs=4k", "--size=64k")
    assert failed.returncode != 0
    slow = fio(server.uri("/dev/mapper/slow"), "--rw=randread", "--bs=4k", "--size=1M",
               "--number_ios=10", "--iodepth=1")
    assert slow.returncode == 0, slow.stderr
    clat_ms = fio_json(slow.stdout)["jobs"][0]["read"]["clat_ns"]["min"] / 1e6
    assert clat_ms >= 45
    dropped = fio(server.uri("/dev/mapper/drop"), "--rw=write", "--bs=4k", "--size=1M",
                  "--buffer_pattern=0x77")
    assert dropped.returncode == 0, dropped.stderr
    # acknowledged, and yet nothing reached the device below
    assert "read 1048576/1048576" in qemu_io(server.uri("/dev/a"), "read -P 0 0 1M").stdout


def test_log_writes_over_nbd_replays_to_each_mark(
    tmp_path: Path, serve: Callable[..., Server],
) -> None:
    data, log = tmp_path / "data.img", tmp_path / "log.img"
    data.write_bytes(bytes(4 << 20))
    log.write_bytes(bytes(16 << 20))
    server = serve(f"--file=/dev/data={data}", f"--file=/dev/log={log}")
    server.dmsetup("create", "lw", "--table", f"0 {(4 << 20) // SECTOR} log-writes /dev/data "
                                              "/dev/log")
    uri = server.uri("/dev/mapper/lw")
    snapshots = {}
    for m in range(3):
        # qemu-io flushes when it closes the export; the mark then follows the data
        out = qemu_io(uri, f"write -P {0x10 + m} {m * 65536 + 4096} 65536")
        assert "wrote 65536/65536" in out.stdout
        server.dmsetup("message", "lw", "0", "mark", f"m{m}")
        snapshots[f"m{m}"] = data.read_bytes()
    for mark, expected in snapshots.items():
        target = tmp_path / f"replay-{mark}.img"
        target.write_bytes(bytes(4 << 20))
        subprocess.run([MINIDISK, "replay-log", "--log", str(log), "--replay", str(target),
                        "--end-mark", mark], check=True, timeout=60)
        assert target.read_bytes() == expected, mark


def test_remove_retry_shows_its_wait_and_succeeds_once_let_go(
        serve: Callable[..., Server]) -> None:
    """`remove --retry` keeps trying while a client holds the device (issue 18 item 6: a wait
    past a second shows, on a pipe as plain lines on stderr); dmsetup's stdout is untouched."""
    server = serve("--memory=/dev/a=16M")
    server.dmsetup("create", "d", "--table", "0 2048 linear /dev/a 0")
    holder = subprocess.Popen([SYSTEM_PYTHON, "-m", "nbd", "-u", server.uri("/dev/mapper/d"), "-c",
                               "print('open', flush=True); import time; time.sleep(2.5)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "open\n"
    done = server.dmsetup("remove", "--retry", "d")
    holder.wait(30)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines and lines[0].startswith("minidisk: removing d: busy, retrying: "), lines
    assert lines[-1].startswith("minidisk: removing d: busy, retrying: done after "), lines
    assert server.dmsetup("ls").stdout == "No devices found\n"
