"""The kernel path end to end through the CLI: attach, file system, detach, nothing left."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.kernel.conftest import Cli, NothingLeft, StateOf, reattached_digests

from minidisk.kernel import mount

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180),
              pytest.mark.usefixtures("cleanup_attachments")]

MIB = 1 << 20


def write_files(directory: Path, total_mib: int) -> dict[str, str]:
    """Write `total_mib` MiB of random data as files of 1 to 4 MiB; return name → sha256."""
    digests, written, n = {}, 0, 0
    while written < total_mib:
        size = min(1 + n % 4, total_mib - written)
        data = os.urandom(size * MIB)
        name = f"f{n:03d}.bin"
        (directory / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
        written += size
        n += 1
    return digests


@pytest.mark.slow
def test_ext4_lifecycle(md: Cli, nbd_uri: str, mountpoint: Path, state_of: StateOf,
                        nothing_left: NothingLeft) -> None:
    device = md("attach", nbd_uri).stdout.strip()
    assert device.startswith("/dev/loop"), device
    attachment = state_of(device)
    assert attachment.method == "nbdfuse" and attachment.uri == nbd_uri
    assert all(helper.alive() for helper in attachment.helpers)  # outlived `minidisk attach`

    assert mount.detect_filesystem(device) is None
    mount.mkfs(device, "ext4", label="minidisk")
    assert mount.detect_filesystem(device) == "ext4"
    mount.mount(device, mountpoint)
    digests = write_files(mountpoint, 50)
    os.sync()
    mount.umount(mountpoint)
    result = mount.fsck(device, force=True)
    assert result.returncode == 0, result.output

    md("detach", device)
    nothing_left(attachment)

    # The data is on the server, not in some cache.
    assert reattached_digests(md, nbd_uri, mountpoint, list(digests), state_of,
                              nothing_left) == digests


def test_read_only_refuses_writes(md: Cli, nbd_uri: str, state_of: StateOf,
                                  nothing_left: NothingLeft) -> None:
    pattern = os.urandom(MIB)
    device = md("attach", nbd_uri).stdout.strip()
    with open(device, "r+b", buffering=0) as f:
        f.write(pattern)
        os.fsync(f.fileno())
    md("detach", device)

    device = md("attach", "--read-only", nbd_uri).stdout.strip()
    attachment = state_of(device)
    assert attachment.read_only
    name = os.path.basename(device)
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
    # Linux lets a read-only block device be opened for writing; the writes fail.
    with open(device, "r+b", buffering=0) as f, pytest.raises(PermissionError):
        f.write(bytes(4096))
    write = subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=4096", "count=1",
                            "oflag=direct", "conv=notrunc"], capture_output=True, text=True)
    assert write.returncode == 1 and "Operation not permitted" in write.stderr, write.stderr
    with open(device, "rb", buffering=0) as f:
        assert f.read(MIB) == pattern
    md("detach", device)
    nothing_left(attachment)


def test_detach_refuses_mounted_device(md: Cli, nbd_uri: str, mountpoint: Path,
                                       state_of: StateOf, nothing_left: NothingLeft) -> None:
    device = md("attach", nbd_uri).stdout.strip()
    attachment = state_of(device)
    mount.mkfs(device)
    mount.mount(device, mountpoint)
    refused = md("detach", device, check=False)
    assert refused.returncode == 1
    assert "mounted on" in refused.stderr and str(mountpoint) in refused.stderr
    assert state_of(device) == attachment  # nothing was undone
    mount.umount(mountpoint)
    md("detach", device)
    nothing_left(attachment)


def test_detach_after_nbdfuse_was_killed(md: Cli, nbd_uri: str, state_of: StateOf,
                                         nothing_left: NothingLeft) -> None:
    device = md("attach", nbd_uri).stdout.strip()
    attachment = state_of(device)
    (helper,) = attachment.helpers
    os.kill(helper.pid, 9)
    md("detach", device)
    nothing_left(attachment)


def test_detach_finishes_after_loop_was_removed(md: Cli, nbd_uri: str, state_of: StateOf,
                                                nothing_left: NothingLeft) -> None:
    """A detach that stopped after its first step (here: done by hand) can be completed."""
    device = md("attach", nbd_uri).stdout.strip()
    attachment = state_of(device)
    subprocess.run(["losetup", "-d", device], check=True)
    md("detach", device)
    nothing_left(attachment)


def test_attach_with_relative_socket_path(md: Cli, nbd_uri: str, state_of: StateOf,
                                          nothing_left: NothingLeft,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    socket_path = Path(nbd_uri.split("socket=", 1)[1])
    monkeypatch.chdir(socket_path.parent)
    device = md("attach", f"nbd+unix:///?socket={socket_path.name}").stdout.strip()
    attachment = state_of(device)
    assert attachment.uri == nbd_uri  # made absolute: nbdfuse runs in "/"
    md("detach", device)
    nothing_left(attachment)


def test_read_only_export_gives_read_only_device(md: Cli, make_export: Callable[..., str],
                                                 state_of: StateOf,
                                                 nothing_left: NothingLeft) -> None:
    device = md("attach", make_export("16M", read_only=True)).stdout.strip()
    attachment = state_of(device)
    assert attachment.read_only  # not asked for, but the server only allows reading
    with open(device, "r+b", buffering=0) as f, pytest.raises(PermissionError):
        f.write(bytes(4096))
    md("detach", device)
    nothing_left(attachment)


def test_a_partial_last_sector_is_refused_or_cut_on_request(
        md: Cli, make_export: Callable[..., str], state_dir: Path, state_of: StateOf,
        nothing_left: NothingLeft) -> None:
    """1000000 bytes are 1953 sectors and 64 bytes: the kernel would drop the 64 unasked."""
    uri = make_export("1000000")
    refused = md("attach", uri, check=False)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"Error: {uri}: the export's size 1000000 is not a multiple of its 512-byte blocks: a "
        "block device would lose its last 64 bytes; give --truncate to attach the first "
        "999936"]
    assert not list(state_dir.glob("*.json"))  # nothing left attached or half set up
    cut = md("attach", "--truncate", uri)
    device = cut.stdout.strip()
    assert "attached as 999936 bytes, the last 64 unreachable (--truncate)" in cut.stderr
    attachment = state_of(device)
    assert int(Path(f"/sys/block/{Path(device).name}/size").read_text()) * 512 == 999936
    md("detach", device)
    nothing_left(attachment)
