"""Drivespecs end to end: bytes through NBD land at begin+offset of the host file, and the
block caches of a running daemon stay inside the -r budget."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tests.daemon.conftest import Server


def _server_pid(sock: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.rstrip(b"\0").endswith(f"unix://{sock}".encode()):
                return int(entry)
    raise LookupError(sock)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("VmRSS")


@pytest.mark.parametrize("etfs_type", ["reg", "chr", "blk"])
def test_window_bytes_land_at_begin_plus_offset(serve: Server, short_tmp: Path,
                                                etfs_type: str) -> None:
    host = short_tmp / "host.img"
    host.write_bytes(b"\xee" * (4 << 20))
    sock = serve("-d", f"key=/w,hostpath={host},offset=1m,size=2m,type={etfs_type}")
    uri = f"nbd+unix:///w?socket={sock}"
    payload = os.urandom(8192)
    src = short_tmp / "payload"
    src.write_bytes(payload)
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -s {src} 4096 8192", "-c", "flush",
                    uri], check=True, capture_output=True)
    data = host.read_bytes()
    assert data[(1 << 20) + 4096:(1 << 20) + 4096 + 8192] == payload
    assert data[:(1 << 20) + 4096] == b"\xee" * ((1 << 20) + 4096)  # nothing outside
    assert data[(1 << 20) + 12288:] == b"\xee" * ((3 << 20) - 12288)
    # Reads see the window too, and the window ends where the drivespec says.
    size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert int(size) == 2 << 20


def test_blk_cache_stays_within_the_ram_limit(serve: Server, short_tmp: Path) -> None:
    host = short_tmp / "big.img"
    with open(host, "wb") as f:  # 256 MiB of data (not a hole: holes would not be cached)
        block = os.urandom(1 << 20)
        for _ in range(256):
            f.write(block)
    sock = serve("-r", "8m", "-d", f"key=/b,hostpath={host},size=host,type=blk")
    uri = f"nbd+unix:///b?socket={sock}"
    pid = _server_pid(sock)
    # Warm up the server's own code paths with a small read, then measure the big copies.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 1M", uri], check=True,
                   capture_output=True, timeout=60)
    before = _rss_kib(pid)
    for _ in range(2):
        subprocess.run(["nbdcopy", uri, "null:"], check=True, timeout=120)
    grown = _rss_kib(pid) - before
    # 8 MiB of cache plus request buffers; an unbounded cache would grow by ~256 MiB.
    assert grown < 8 * 1024 + 48 * 1024, f"server RSS grew by {grown} KiB"
