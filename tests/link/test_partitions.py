"""Partition keys (`owner.disk.N`): alice.0191 is an MBR disk made by real sfdisk, with ext4 in
both partitions (p1.txt only in partition 1, p2.txt only in partition 2); linking
alice.0191.2 mounts partition 2 alone, read-only, at its offset and size."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from tests.harness import scaled
from tests.link.link_helpers import Site, mount_options, run_ls

from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.state import attachments
from minidisk.link import linker

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120),
              pytest.mark.parametrize("site", ["partitioned"], indirect=True)]

P2 = "partition 2 of alice's 0191\n"


def _loops_over(device: str) -> list[str]:
    """Loop devices backed by `device` (mount -o offset= makes one per partition mount)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().strip() == device:
            found.append(backing.parent.parent.name)
    return found


def test_link_a_partition(site: Site) -> None:
    site.grant("root", "alice.0191", "W")
    site.grant("nobody", "alice.0191", "W")
    mnt = site.root / "mnt"
    done = site.cli("link", "alice.0191.2", str(mnt))
    assert done.returncode == 0, done.stderr
    assert f"mounted at {mnt} (ext4, ro)" in done.stdout
    assert (mnt / "p2.txt").read_text() == P2
    assert not (mnt / "p1.txt").exists()  # partition 2, and only it
    assert "ro" in mount_options(mnt)  # an R link: read-only, here too
    state = linker.find("alice.0191")
    assert state.partition == 2 and state.mountpoint == str(mnt)
    assert len(_loops_over(state.device)) == 1
    assert linker.find(str(mnt)).disk == "alice.0191"
    with pytest.raises(OSError) as e:
        (mnt / "new").write_text("x")
    assert e.value.errno == 30  # EROFS
    # Partition 1 of the same disk cannot be linked beside it (one link per disk here).
    again = site.cli("link", "alice.0191.1", str(site.root / "mnt1"))
    assert again.returncode == 1 and "already linked" in again.stderr, again.stderr
    assert (mnt / "p2.txt").read_text() == P2  # and the refusal undid nothing of ours
    done = site.cli("unlink", str(mnt))
    assert done.returncode == 0, done.stderr
    assert not kernel_mount.mounted_at(mnt) and not attachments() and not linker.links()
    assert not _loops_over(state.device)
    site.wait_linkable("alice.0191", "W")


def test_a_partition_that_does_not_exist(site: Site) -> None:
    site.grant("root", "alice.0191", "R")
    done = site.cli("link", "alice.0191.3", str(site.root / "mnt"))
    assert done.returncode == 1 and "no partition 3" in done.stderr, done.stderr
    assert not attachments() and not linker.links()
    no_mountpoint = site.cli("link", "alice.0191.2")
    assert no_mountpoint.returncode == 1 and "mount point" in no_mountpoint.stderr, \
        no_mountpoint.stderr


@pytest.mark.autofs
def test_automount_a_partition(site: Site, automounter: tuple[object, Path]) -> None:
    root = automounter[1] / "root"  # root's own subtree of /vmlink
    listed = run_ls(root / "alice.0191.2")
    assert listed.returncode == 0 and "p2.txt" in listed.stdout, listed.stderr
    assert "p1.txt" not in listed.stdout
    assert (root / "alice.0191.2" / "p2.txt").read_text() == P2
    assert "ro" in mount_options(root / "alice.0191.2")
    alias = run_ls(root / "ALICE.191.2")  # normalised, through a symlink
    assert alias.returncode == 0 and "p2.txt" in alias.stdout
    assert os.readlink(root / "ALICE.191.2") == "alice.0191.2"
    assert run_ls(root / "alice.0191.7").returncode == 2  # no such partition: ls says ENOENT
    [state] = linker.links()
    assert state.disk == "alice.0191" and state.partition == 2
    deadline = time.monotonic() + scaled(30)  # idle: expired, unmounted, detached, unlinked
    while mount_options(root / "alice.0191.2") or attachments() or linker.links():
        assert time.monotonic() < deadline, (site.root / "automount.log").read_text()
        time.sleep(0.2)
    assert not _loops_over(state.device)
    site.wait_linkable("alice.0191", "W")
