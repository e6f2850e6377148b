"""Bad input to attach and detach: clear messages, exit 1, and nothing left behind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.kernel.conftest import Cli

from minidisk.kernel import mount

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


@pytest.mark.parametrize(("args", "message"), [
    (("--list", "nbd://h/"), "give a URI or --list, not both"),
    ((), "missing argument URI (or --list)"),
    (("--connections", "0", "nbd://h/"), "0 is not in the range 1<=x<=64"),
    (("--timeout", "-1", "nbd://h/"), "-1 is not in the range x>=0"),
])
def test_attach_option_errors(md: Cli, state_dir: Path, args: tuple[str, ...],
                              message: str) -> None:
    done = md("attach", *args, check=False)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr


@pytest.mark.parametrize("option", [("--connections", "2"), ("--timeout", "5"), ("--persist",)])
def test_kernel_nbd_options_refused_for_nbdfuse(md: Cli, state_dir: Path, nbd_uri: str,
                                                option: tuple[str, str]) -> None:
    done = md("attach", "--method", "nbdfuse", *option, nbd_uri, check=False)
    assert done.returncode == 1
    assert f"{option[0]}: kernel nbd's only; nbdfuse was chosen" in done.stderr, done.stderr
    assert not state_dir.exists() or list(state_dir.iterdir()) == []


def test_attach_list(md: Cli, state_dir: Path, make_export: Callable[..., str]) -> None:
    assert md("attach", "--list").stdout.split() == ["DEVICE", "METHOD", "PID", "URI"]
    first, second = make_export("16M"), make_export("16M", read_only=True)
    devices = [md("attach", first).stdout.strip(), md("attach", second).stdout.strip()]
    lines = md("attach", "--list").stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "METHOD", "PID", "URI"]
    listed = {fields[0]: fields[1:] for fields in (line.split() for line in lines[1:])}
    assert sorted(listed) == sorted(devices)
    for device, uri in zip(devices, (first, second), strict=True):
        method, pid, listed_uri = listed[device]
        assert (method, listed_uri) == ("nbdfuse", uri)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "nbdfuse"
    for device in devices:
        md("detach", device)
    assert md("attach", "--list").stdout.split() == ["DEVICE", "METHOD", "PID", "URI"]
