"""A governed disk is governed wherever its bytes appear (issue 10, item 4): no dm table may
map it and no second key may serve its host file (compared by (st_dev, st_ino): another
path, a hard link, a directory key holding it), and what slipped past (a key made before
the directory named the disk) is opened by nobody.

On a TLS site: a user's certificate (bob) is admitted to every export the directory does
not govern, so a key over a governed disk would hand it alice's bytes without a link."""

from __future__ import annotations

import os
import subprocess

import pytest
from tests.harness import MINIDISK
from tests.link.link_helpers import Site

pytestmark = pytest.mark.timeout(120)


def _admin(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    """A control command as ops, the site's one administrator certificate."""
    return subprocess.run([MINIDISK, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **site.env,
                               "MINIDISK_TLS_CERTIFICATES": str(site.pki["ops"])})


def _bob_reads(site: Site, export: str) -> bool:
    done = subprocess.run(["nbdinfo", site.uri(export, "bob")], capture_output=True,
                          text=True, timeout=30)
    return done.returncode == 0


def _refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Failed, with one line that says why (dmsetup frames it as libdm does: the ioctl that
    failed, the reason, "Command failed.")."""
    assert done.returncode == 1, done.stdout
    why = [line for line in done.stderr.splitlines() if all(w in line for w in words)]
    assert len(why) == 1, done.stderr


def test_no_table_over_a_governed_key(tls_site: Site) -> None:
    site = tls_site
    assert not _bob_reads(site, "alice/0192")  # no link: governed
    done = _admin(site, "dmsetup", "create", "stack", "--table", "0 2048 linear /alice/0192 0")
    # dmsetup prints the failed ioctl only; the reason is in the server's log (as the kernel's
    # is in its log)
    assert done.returncode == 1 and done.stderr.startswith("device-mapper: reload ioctl on stack")
    log = (site.root / "server.log").read_text().splitlines()
    assert any(all(w in line for w in ("/alice/0192", "alice.0192", "governs")) for line in log)
    assert not _bob_reads(site, "dev/mapper/stack")
    # A table over an ungoverned key is still fine, and so is bob reading it.
    (site.root / "free.img").write_bytes(bytes(1 << 20))
    assert _admin(site, "etfs", "register", "/free", str(site.root / "free.img")).returncode == 0
    assert _admin(site, "dmsetup", "create", "ok", "--table",
                  "0 2048 linear /free 0").returncode == 0
    assert _bob_reads(site, "dev/mapper/ok")


def test_no_second_key_over_a_governed_host_file(tls_site: Site) -> None:
    site = tls_site
    image = site.root / "0191.img"  # alice.0191's host file
    alias = site.root / "sub" / "also-0191.img"
    alias.parent.mkdir()
    os.link(image, alias)  # another name, the same (st_dev, st_ino)
    for key, path, kind in (("/alias", alias, "blk"), ("/window", image, "reg"),
                            ("/tree", site.root, "dir_subdirs")):
        done = _admin(site, "etfs", "register", "-t", kind, key, str(path))
        _refused(done, "alice.0191", "governs")
        assert not _bob_reads(site, key.lstrip("/"))
    assert not _bob_reads(site, "tree/0191.img")


def test_a_key_made_before_the_directory_named_the_disk_is_opened_by_nobody(
        tls_site: Site) -> None:
    site = tls_site
    image = site.root / "0193.img"
    image.write_bytes(bytes(1 << 20))
    for key in ("/early", "/twin"):  # two keys over one file: fine while nothing governs it
        assert _admin(site, "etfs", "register", key, str(image)).returncode == 0
    assert _bob_reads(site, "twin")
    site.cli("directory", "define", "alice.0193", "--server", site.url, "--key", "/early",
             check=True)
    assert not _bob_reads(site, "early")  # governed now: bob has no link
    assert not _bob_reads(site, "twin"), "the governed file is still served as /twin"


def test_a_governed_file_below_a_directory_key_is_governed_under_other_keys(
        tls_site: Site) -> None:
    site = tls_site
    homes = site.root / "homes"
    homes.mkdir()
    (homes / "g.img").write_bytes(bytes(1 << 20))
    os.link(homes / "g.img", site.root / "g-link.img")
    assert _admin(site, "etfs", "register", "-t", "dir", "/homes", str(homes)).returncode == 0
    site.cli("directory", "define", "alice.0194", "--server", site.url, "--key",
             "/homes/g.img", check=True)
    _refused(_admin(site, "etfs", "register", "/g", str(site.root / "g-link.img")),
             "alice.0194", "governs")
    assert not _bob_reads(site, "g")
    assert not _bob_reads(site, "homes/g.img")  # no link: the disk itself is governed
