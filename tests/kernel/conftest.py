"""Fixtures for kernel attach: an NBD server per test, a private state directory, and cleanup
of whatever a failing test leaves attached or mounted.

The server is nbdkit's memory plugin for now. To test against minidisk's own server, change
`make_export` only: every test asks for a URI and never sees which server answers it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from tests import harness
from tests.harness import MINIDISK

from minidisk import kernel
from minidisk.kernel import mount, state
from minidisk.kernel.commands import Helper, wait_until

MakeExport = Callable[..., str]
Cli = Callable[..., subprocess.CompletedProcess[str]]  # the `md` fixture
StateOf = Callable[[str], state.Attachment]
NothingLeft = Callable[[state.Attachment], None]


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel attach needs root")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/fuse and loop devices")


@pytest.fixture
def state_dir(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MINIDISK_STATE_DIR, seen by in-process calls and by the CLI we start."""
    directory = short_tmp / "state"
    monkeypatch.setenv("MINIDISK_STATE_DIR", str(directory))
    return directory / "attach"


@pytest.fixture
def make_export(short_tmp: Path) -> Iterator[MakeExport]:
    """`make_export(size="256M", read_only=False)` → the URI of a fresh memory export;
    `filters=("blocksize-policy",), params=("blocksize-minimum=4096",)` are nbdkit's."""
    servers: list[harness.Process] = []

    def start(size: str = "256M", read_only: bool = False, filters: Sequence[str] = (),
              params: Sequence[str] = ()) -> str:
        sock = short_tmp / f"nbd{len(servers)}.sock"
        pidfile = sock.with_suffix(".pid")  # nbdkit writes it once it listens
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidfile)]
        if read_only:
            argv.append("-r")
        argv += [f"--filter={f}" for f in filters]
        servers.append(harness.start([*argv, "memory", size, *params],
                                     sock.with_suffix(".log"), lambda _: pidfile.exists()))
        return f"nbd+unix:///?socket={sock}"

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def nbd_uri(make_export: MakeExport) -> str:
    return make_export()


@pytest.fixture
def mountpoint(short_tmp: Path) -> Iterator[Path]:
    directory = short_tmp / "mnt"
    directory.mkdir()
    yield directory
    if mount.mounted_at(directory):
        mount.umount(directory, lazy=True)


@pytest.fixture
def cleanup_attachments(state_dir: Path) -> Iterator[None]:
    """Detach whatever a test left attached in its state directory (after unmounting it)."""
    yield
    for attachment in state.attachments():
        for where in mount.mounts_of(attachment.device):
            with contextlib.suppress(kernel.CommandError):
                mount.umount(where, lazy=True)
        with contextlib.suppress(kernel.KernelError):
            kernel.detach(attachment.device)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed `minidisk` console script, as a user would."""
    done = subprocess.run([MINIDISK, *args], capture_output=True, text=True, timeout=90,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"minidisk {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr}")
    return done


def read_digests(directory: Path, names: list[str]) -> dict[str, str]:
    """name -> sha256 of the files `names` in `directory`."""
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}


def reattached_digests(md: Cli, uri: str, mountpoint: Path, names: list[str],
                       state_of: StateOf, nothing_left: NothingLeft) -> dict[str, str]:
    """Attach `uri` afresh, mount it read-only and read back the digests of `names` (bytes
    that were only in some cache are gone by now); detached afterwards, nothing left."""
    device = md("attach", uri).stdout.strip()
    attachment = state_of(device)
    mount.mount(device, mountpoint, read_only=True)
    digests = read_digests(mountpoint, names)
    mount.umount(mountpoint)
    md("detach", device)
    nothing_left(attachment)
    return digests


def load_state(state_dir: Path, device: str) -> state.Attachment:
    path = state_dir / f"{os.path.basename(device)}.json"
    return state.Attachment.from_json(path.read_text())


def helper_gone(helper: Helper) -> Callable[[], bool]:
    return lambda: not helper.alive()


def assert_nothing_left(state_dir: Path, attachment: state.Attachment) -> None:
    """No loop device on our file, no FUSE mount, no running helper, an empty state dir."""
    backing = Path(f"/sys/block/{attachment.name}/loop/backing_file")
    if backing.exists():
        assert backing.read_text().strip() != attachment.backing_file
    assert attachment.backing_file not in subprocess.run(
        ["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True).stdout
    with open("/proc/self/mountinfo") as f:
        assert str(state_dir) not in f.read()
    for helper in attachment.helpers:
        # A zombie waiting for init to reap it counts as gone: it no longer serves anything.
        assert wait_until(helper_gone(helper), 5.0), f"{helper} still running"
    assert list(state_dir.iterdir()) == [], json.dumps(
        [str(p) for p in state_dir.rglob("*")])


# The helpers reach the test modules as fixtures (the test functions ask for what they use).
@pytest.fixture
def md() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


@pytest.fixture
def nothing_left(state_dir: Path) -> Callable[[state.Attachment], None]:
    return lambda attachment: assert_nothing_left(state_dir, attachment)


@pytest.fixture
def state_of(state_dir: Path) -> Callable[[str], state.Attachment]:
    return lambda device: load_state(state_dir, device)
