"""A mapped device as a real kernel block device: a striped table over two host files,
attached, ext4 made and mounted on it, its table reloaded under the mounted file system, and
fsck clean afterwards; the bytes of every file survive a fresh attach."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.kernel.conftest import (
    Cli,
    NothingLeft,
    StateOf,
    read_digests,
    reattached_digests,
)

from minidisk.kernel import mount

pytestmark = [pytest.mark.kernel, pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.usefixtures("cleanup_attachments")]

MIB = 1 << 20
SECTORS = 2 * 64 * MIB // 512  # two 64 MiB files, striped
ONE_TABLE = f"0 {SECTORS} striped 2 128 /dev/a 0 /dev/b 0"
# The same mapping in two segments: each half of the device is striped over the matching
# half of each file (offsets in sectors of each file).
HALF = SECTORS // 2
TWO_SEGMENTS = (f"0 {HALF} striped 2 128 /dev/a 0 /dev/b 0\n"
                f"{HALF} {HALF} striped 2 128 /dev/a {HALF // 2} /dev/b {HALF // 2}")


@pytest.fixture
def dm_server(short_tmp: Path) -> Iterator[str]:
    """A `minidisk serve` with /dev/mapper/s striped over two host files; its socket URL."""
    for name in ("a.img", "b.img"):
        with open(short_tmp / name, "wb") as f:
            f.truncate(64 * MIB)
    table = short_tmp / "s.table"
    table.write_text(ONE_TABLE + "\n")
    server = harness.serve(short_tmp, f"--file=/dev/a={short_tmp / 'a.img'}",
                           f"--file=/dev/b={short_tmp / 'b.img'}", f"--table=s={table}",
                           name="dm")
    try:
        yield server.url
    finally:
        server.stop(30)


def _files(directory: Path, prefix: str, count: int) -> dict[str, str]:
    digests = {}
    for n in range(count):
        data = os.urandom((1 + n % 3) * MIB)
        (directory / f"{prefix}{n}.bin").write_bytes(data)
        digests[f"{prefix}{n}.bin"] = hashlib.sha256(data).hexdigest()
    return digests


def test_ext4_on_a_striped_device_survives_a_reload(
        md: Cli, dm_server: str, mountpoint: Path, state_of: StateOf,
        nothing_left: NothingLeft) -> None:
    socket_path = dm_server.removeprefix("unix://")
    uri = f"nbd+unix:///dev/mapper/s?socket={socket_path}"

    def dmsetup(*args: str) -> str:
        return md("dmsetup", "--server", dm_server, *args).stdout

    device = md("attach", uri).stdout.strip()
    attachment = state_of(device)
    mount.mkfs(device, "ext4")
    mount.mount(device, mountpoint)
    digests = _files(mountpoint, "before", 8)
    os.sync()
    # Reload under the mounted file system: suspend (flushes, queues new I/O), load the same
    # mapping as two segments, resume; the file system never notices.
    dmsetup("suspend", "s")
    assert "SUSPENDED" in dmsetup("info", "s")
    md("dmsetup", "--server", dm_server, "load", "s", "--table", TWO_SEGMENTS)
    dmsetup("resume", "s")
    assert dmsetup("table", "s").count("striped") == 2
    digests |= _files(mountpoint, "after", 8)
    os.sync()
    assert read_digests(mountpoint, list(digests)) == digests
    mount.umount(mountpoint)
    result = mount.fsck(device, force=True)
    assert result.returncode == 0, result.output
    assert dmsetup("status", "s").splitlines() == [
        f"0 {HALF} striped 2 240:0 240:1 1 AA",  # the keys by number, as the kernel prints
        f"{HALF} {HALF} striped 2 240:0 240:1 1 AA"]
    md("detach", device)
    nothing_left(attachment)

    # The bytes are in the host files behind the table, not in a cache.
    assert reattached_digests(md, uri, mountpoint, list(digests), state_of,
                              nothing_left) == digests
