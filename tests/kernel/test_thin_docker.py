"""Docker's devicemapper driver on minidisk's thin-pool (issue 13, part 3).

What that driver does with a pool: one thin volume holds an ext4 base image; every container
gets a snapshot of it (create_snap of the base, suspended meanwhile, as the kernel's
thin-provisioning.rst says for an active origin) and mounts it. Here ten snapshots are
attached (nbdfuse + loop, as a user would) and mounted at once, each written on its own; each
sees the base's files and only its own, the base never sees theirs, the pool's used data
blocks grow by the blocks the snapshots wrote and not by copies of what they share, and
thin_check finds the metadata clean.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.dm.dm_helpers import Server, serve
from tests.kernel.conftest import Cli

from minidisk.kernel import mount

BLOCK_SECTORS = 128  # 64 KiB data blocks, the driver's default
BLOCK = BLOCK_SECTORS * 512
DATA_SIZE = 512 << 20
VOLUME_SIZE = 256 << 20
BASE_FILE = 32 << 20  # 512 blocks: what a copy of the base's data would cost each snapshot
CONTAINER_FILE = 1 << 20  # 16 blocks written by each container
CONTAINERS = 10
# ext4's own writes in one mount, write and unmount of a snapshot (journal, bitmaps, group
# descriptors, inode table and directory blocks: each a 64 KiB block copied on first write).
# Measured: 5 blocks a container here (+210 for ten, 160 of them their files); the bound
# leaves room for another ext4 and is still a twentieth of a copy of the base's data.
METADATA_BLOCKS = 24

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("cleanup_attachments")]


@pytest.fixture
def pool(short_tmp: Path) -> Iterator[tuple[Server, Path]]:
    """A server with the pool's metadata in a file (for thin_check) and data in memory."""
    meta = short_tmp / "meta.img"
    meta.write_bytes(bytes(16 << 20))
    server = serve(short_tmp, "--file", f"/dev/meta={meta}", "--memory", f"/dev/data={DATA_SIZE}")
    try:
        yield server, meta
    finally:
        server.stop()


def used_data_blocks(server: Server) -> int:
    """The pool's used data blocks, from its status (`T used_meta/total used_data/total ...`)."""
    fields = server.dmsetup("status", "pool").stdout.split()
    return int(fields[5].split("/")[0])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ten_containers_on_snapshots_of_one_base(pool: tuple[Server, Path], md: Cli,
                                                  short_tmp: Path) -> None:
    server, meta = pool
    sectors = VOLUME_SIZE // 512
    server.dmsetup("create", "pool", "--table",
                   f"0 {DATA_SIZE // 512} thin-pool /dev/meta /dev/data {BLOCK_SECTORS} 0")
    server.dmsetup("message", "pool", "0", "create_thin 0")
    server.dmsetup("create", "base", "--table", f"0 {sectors} thin /dev/mapper/pool 0")

    # The base image: ext4 with every table written now (no lazy init writing later).
    base_mnt = short_tmp / "base"
    base_mnt.mkdir()
    device = md("attach", server.uri("/dev/mapper/base")).stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    device], check=True)
    mount.mount(device, base_mnt)
    (base_mnt / "image").write_bytes(os.urandom(BASE_FILE))
    image = digest(base_mnt / "image")
    mount.umount(base_mnt)
    md("detach", device)
    before = used_data_blocks(server)
    assert before >= BASE_FILE // BLOCK

    mounted: list[tuple[str, Path]] = []
    try:
        for i in range(1, CONTAINERS + 1):
            server.dmsetup("suspend", "base")  # an active origin is suspended for its snapshot
            server.dmsetup("message", "pool", "0", f"create_snap {i} 0")
            server.dmsetup("resume", "base")
            server.dmsetup("create", f"c{i}", "--table",
                           f"0 {sectors} thin /dev/mapper/pool {i}")
            where = short_tmp / f"c{i}"
            where.mkdir()
            device = md("attach", server.uri(f"/dev/mapper/c{i}")).stdout.strip()
            mount.mount(device, where)
            mounted.append((device, where))
        contents = {}
        for i, (_, where) in enumerate(mounted, 1):
            data = os.urandom(CONTAINER_FILE)
            (where / f"own-{i}").write_bytes(data)
            contents[i] = hashlib.sha256(data).hexdigest()
        for _, where in mounted:
            subprocess.run(["sync", "-f", str(where)], check=True)
        for i, (_, where) in enumerate(mounted, 1):
            names = sorted(p.name for p in where.iterdir() if p.name != "lost+found")
            assert names == sorted(["image", f"own-{i}"]), (i, names)
            assert digest(where / "image") == image
            assert digest(where / f"own-{i}") == contents[i]
    finally:
        for device, where in mounted:
            if mount.mounted_at(where):
                mount.umount(where)
            md("detach", device)

    grown = used_data_blocks(server) - before
    own = CONTAINERS * CONTAINER_FILE // BLOCK
    # At least every container's own file in blocks of its own; far less than a copy of the
    # base's data for each.
    assert own <= grown <= CONTAINERS * (CONTAINER_FILE // BLOCK + METADATA_BLOCKS), grown
    assert grown < CONTAINERS * BASE_FILE // BLOCK

    # The base never saw the containers' writes.
    device = md("attach", server.uri("/dev/mapper/base")).stdout.strip()
    try:
        mount.mount(device, base_mnt, read_only=True)
        assert sorted(p.name for p in base_mnt.iterdir()) == ["image", "lost+found"]
        assert digest(base_mnt / "image") == image
        mount.umount(base_mnt)
    finally:
        md("detach", device)

    # Committed metadata that the kernel's own tools call clean.
    for name in ("base", *(f"c{i}" for i in range(1, CONTAINERS + 1)), "pool"):
        server.dmsetup("remove", name)
    check = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"pool data blocks: {before} after the base, +{grown} for {CONTAINERS} containers "
          f"({own} of them their files)")
