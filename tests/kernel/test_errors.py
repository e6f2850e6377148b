"""Bad input to attach and detach: clear messages, exit 1, and nothing left behind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from minidisk.kernel import mount

Cli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120),
              pytest.mark.usefixtures("cleanup_attachments")]


@pytest.fixture
def foreign_loop(short_tmp: Path) -> Iterator[str]:
    """A loop device set up with plain losetup, which minidisk must not touch."""
    image = short_tmp / "foreign.img"
    image.write_bytes(b"\0" * (1 << 20))
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def test_detach_of_a_loop_device_we_did_not_attach(md: Cli, state_dir: Path,
                                                   foreign_loop: str) -> None:
    done = md("detach", foreign_loop, check=False)
    assert done.returncode == 1
    assert "was not attached by minidisk" in done.stderr
    name = Path(foreign_loop).name
    assert Path(f"/sys/block/{name}/loop/backing_file").exists()  # left alone


@pytest.mark.parametrize(("device", "message"), [
    ("/dev/no-such-device", "no such device"),
    ("no-such-device", "no such device"),
    ("/etc/hostname", "is not a block device"),
])
def test_detach_of_unknown_devices(md: Cli, state_dir: Path, device: str, message: str) -> None:
    done = md("detach", device, check=False)
    assert done.returncode == 1
    assert message in done.stderr, done.stderr


def test_detach_twice(md: Cli, nbd_uri: str) -> None:
    device = md("attach", nbd_uri).stdout.strip()
    md("detach", device)
    again = md("detach", device, check=False)
    assert again.returncode == 1
    assert "not attached by minidisk" in again.stderr


@pytest.mark.parametrize(("uri", "message"), [
    ("http://example.com/x", "scheme must be one of"),
    ("nbd+unix:///export", "needs ?socket=PATH"),
    ("nbd+unix://host/export?socket=/tmp/s", "takes no host or port"),
    ("nbd:///export", "needs a host"),
    ("nbd://host:notaport/", "bad NBD URI"),
    ("nbd://host/?socket=/tmp/s", "belongs to nbd+unix"),
    ("nbd+unix:///?socket=/tmp/s&colour=red", "unknown query parameter"),
])
def test_attach_refuses_bad_uris(md: Cli, state_dir: Path, uri: str, message: str) -> None:
    done = md("attach", uri, check=False)
    assert done.returncode == 1
    assert message in done.stderr, done.stderr
    assert done.stdout == ""
    assert not state_dir.exists() or list(state_dir.iterdir()) == []


def test_attach_to_a_missing_server_leaves_nothing(md: Cli, short_tmp: Path,
                                                   state_dir: Path) -> None:
    missing = short_tmp / "nobody.sock"
    before = subprocess.run(["losetup", "-l", "-n"], capture_output=True, text=True).stdout
    done = md("attach", f"nbd+unix:///?socket={missing}", check=False)
    assert done.returncode == 1
    assert "nbdfuse could not attach" in done.stderr
    assert "No such file or directory" in done.stderr  # nbdfuse's own reason is quoted
    assert list(state_dir.iterdir()) == []
    assert str(state_dir) not in subprocess.run(["losetup", "-l", "-n"], capture_output=True,
                                                text=True).stdout
    assert str(state_dir) not in before
    with open("/proc/self/mountinfo") as f:
        assert str(state_dir) not in f.read()


def test_fsck_reports_a_device_without_file_system(md: Cli, nbd_uri: str) -> None:
    """The fsck wrapper must be able to fail, or the clean result elsewhere means nothing."""
    device = md("attach", nbd_uri).stdout.strip()
    with pytest.raises(mount.CommandError, match="fsck failed"):
        mount.fsck(device, fstype="ext4")
    md("detach", device)
