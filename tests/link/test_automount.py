"""`minidisk automount`: a real autofs mount, real lookups from other processes, expiry."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from link_helpers import MINIDISK, NOBODY, Site, autofs_mounted, mount_options, run_ls

from minidisk.daemon.control import ControlError
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.state import attachments
from minidisk.link import linker

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

def test_entering_links_and_mounts_then_expiry_undoes_it(
        site: Site, automounter: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, root = automounter
    listed = run_ls(root / "alice.0191")
    assert listed.returncode == 0 and "hello.txt" in listed.stdout, listed.stderr
    mnt = root / "alice.0191"
    assert kernel_mount.mounted_at(mnt)
    assert "ro" in mount_options(mnt)  # the grant says R: a read link, mounted ro
    alias = run_ls(root / "ALICE.191")  # normalised: the same disk, through a symlink
    assert alias.returncode == 0 and "hello.txt" in alias.stdout
    assert os.readlink(root / "ALICE.191") == "alice.0191"
    with pytest.raises(ControlError, match="R by uid:0"):
        site.holder(NOBODY).link("alice.0191", "W")  # the lookup's link is a real one
    assert any(who == "uid:0" and action == "link" and "automount uid:0" in why
               for who, action, _, _, why in site.audit())
    deadline = time.monotonic() + 30
    # Poll mountinfo only: a path walk through /vmlink/alice.0191 (realpath, stat) counts as
    # use and would keep postponing the expiry.
    while mount_options(mnt) or attachments() or linker.links():
        assert time.monotonic() < deadline, (site.root / "automount.log").read_text()
        time.sleep(0.2)
    site.wait_linkable("alice.0191", "W")  # and the lock is gone


def test_bad_keys_are_enoent_and_audited(
        site: Site, automounter: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, root = automounter
    long_key = "a" * 255
    for name in ("alice..0191", "a/b", "bob.0191", "alice.0999", long_key, "alice.0191.x"):
        with pytest.raises(FileNotFoundError):
            os.stat(root / name)
    with pytest.raises(OSError) as too_long:  # the kernel refuses it before asking anyone
        os.stat(root / ("a" * 300))
    assert too_long.value.errno == errno.ENAMETOOLONG
    assert os.path.samefile(root / "..", root.parent)  # ".." is the kernel's, never a key
    refused = {disk for who, action, disk, outcome, _ in site.audit()
               if action == "resolve" and outcome == "refused"}
    # (The 255-character name is refused by the kernel itself: it never asks the daemon.)
    assert {"alice..0191", "a", "bob.0191", "alice.0999", "alice.0191.x"} <= refused
    assert not os.listdir(root) and not attachments() and not linker.links()


def test_stopping_leaves_no_hung_caller_and_no_mount(
        site: Site, automounter: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, root = automounter
    assert run_ls(root / "alice.0191").returncode == 0
    os.kill(proc.pid, signal.SIGSTOP)  # requests now wait for an automounter that is away
    waiting = subprocess.Popen(["stat", str(root / "alice.0192")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    assert waiting.poll() is None  # hung on us
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    assert waiting.wait(10) != 0  # answered (ENOENT), not left hanging
    assert proc.wait(30) == 0
    assert not autofs_mounted(root) and not kernel_mount.mounted_at(root / "alice.0191")
    assert not attachments() and not linker.links()
    site.wait_linkable("alice.0191", "W")


def test_program_map_prints_an_entry(site: Site) -> None:
    site.cli("directory", "grant", "root", "alice.0191", "--mode", "R", check=True)
    done = site.cli("automount", "--program-map", "alice.191")
    assert done.returncode == 0, done.stderr
    options, device = done.stdout.split()
    assert options == "-fstype=ext4,ro" and device.startswith(":/dev/loop")
    assert site.cli("unlink", "alice.0191").returncode == 0
    bad = site.cli("automount", "--program-map", "../etc")
    assert bad.returncode != 0 and bad.stdout == ""


def test_unlink_idle_ends_program_map_links_once_unmounted(site: Site, tmp_path: Path) -> None:
    """The stock automount has no unmount hook; `unlink --idle` (from a timer) ends the links
    it asked for once their device is mounted nowhere -- and never one made by hand."""
    site.cli("directory", "grant", "root", "alice.0191", "--mode", "R", check=True)
    done = site.cli("automount", "--program-map", "alice.191")
    assert done.returncode == 0, done.stderr
    device = done.stdout.split()[1].removeprefix(":")
    young = site.cli("unlink", "--idle")  # default --min-age 60: the automounter may be
    assert young.returncode == 0 and young.stdout == ""  # about to mount it
    assert [s.disk for s in linker.links()] == ["alice.0191"]
    mnt = tmp_path / "m"
    mnt.mkdir()
    kernel_mount.mount(device, mnt, read_only=True)
    try:
        busy = site.cli("unlink", "--idle", "--min-age", "0")
        assert busy.returncode == 0 and busy.stdout == ""  # mounted: in use
        assert linker.links()
    finally:
        kernel_mount.umount(mnt)
    idle = site.cli("unlink", "--idle", "--min-age", "0")
    assert idle.returncode == 0 and idle.stdout == "alice.0191 unlinked (idle)\n", idle.stderr
    assert not linker.links() and not attachments()
    site.wait_linkable("alice.0191", "R", uid=0).close()  # the lock is free again
    by_hand = site.cli("link", "alice.0191", str(mnt))  # mounted by us, not a program map
    assert by_hand.returncode == 0, by_hand.stderr
    try:
        kernel_mount.umount(mnt)  # even unmounted behind our back it is not "idle"
        assert site.cli("unlink", "--idle", "--min-age", "0").stdout == ""
        assert [s.disk for s in linker.links()] == ["alice.0191"]
    finally:
        assert site.cli("unlink", "alice.0191").returncode == 0
    neither = site.cli("unlink")
    assert neither.returncode == 2 and "TARGET or --idle" in neither.stderr


def test_quickstart_vmlink_once() -> None:
    done = subprocess.run([MINIDISK, "quickstart-vmlink", "--once"], capture_output=True,
                          text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    assert "hello from alice's 0191" in done.stdout
    with open("/proc/self/mountinfo") as f:
        assert "minidisk-vmlink-" not in f.read()
