"""The server as the authority: who may link, who may open a disk, and how long a link lives."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tests.link.link_helpers import NOBODY, OWNER_UID, WRITE_AS_CLIENT, Site, as_user

from minidisk.control_client import ControlError
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.state import attachments
from minidisk.link import linker
from minidisk.link.modes import PasswordClass
from minidisk.link.names import parse_key

pytestmark = pytest.mark.timeout(120)




def _grant(site: Site, who: str, disk: str, mode: str) -> None:
    site.cli("directory", "grant", who, disk, "--mode", mode, check=True)


def test_no_grant_is_refused_and_audited(site: Site) -> None:
    with pytest.raises(ControlError) as refused:
        site.holder(NOBODY).link("alice.0192", "R")
    assert refused.value.errno == 13 and "no grant" in str(refused.value)
    assert (f"uid:{NOBODY}", "link", "alice.0192", "refused",
            f"uid:{NOBODY} has no grant on alice.0192 and it has no read password: "
            "ask its administrator") in site.audit()
    with pytest.raises(ControlError) as unknown:
        site.holder(NOBODY).link("bob.0191", "R")
    assert unknown.value.errno == 2
    assert site.audit()[-1][1:4] == ("link", "bob.0191", "refused")
    # The operator sees refusals in the server's log too, at WARNING, with a timestamp.
    log = (site.root / "server.log").read_text().splitlines()
    refusal = [line for line in log if f"link refused to uid:{NOBODY}: 'alice.0192'" in line]
    assert len(refusal) == 1 and " WARNING minidisk.link.authority: " in refusal[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} minidisk\[\d+\] ", refusal[0])


def test_raw_nbd_client_needs_a_live_link(site: Site) -> None:
    uri = site.uri("alice/0192")
    refused = as_user(NOBODY, "nbdinfo", uri)
    # ERR_POLICY at GO (libnbd 1.14 words it "Operation not supported for export"); an
    # unknown export would be ENOENT instead.
    assert refused.returncode == 1, refused.stdout
    assert "Operation not supported for export" in refused.stderr, refused.stderr  # libnbd 1.14
    unknown = as_user(NOBODY, "nbdinfo", site.uri("alice/nothing"))
    assert unknown.returncode != 0 and "not supported" not in unknown.stderr
    listed = as_user(NOBODY, "nbdinfo", "--list", site.uri(""))
    assert "alice/0192" not in listed.stdout
    assert as_user(OWNER_UID, "nbdinfo", uri).returncode == 0  # the owner, always
    _grant(site, "nobody", "alice.0192", "W")
    holder = site.holder(NOBODY)
    holder.link("alice.0192", "R")
    allowed = as_user(NOBODY, "/usr/bin/python3", "-c", WRITE_AS_CLIENT, uri)
    assert allowed.stdout.split("\n")[:2] == ["read-only", "refused EPERM"], allowed.stderr
    holder.close()
    deadline = time.monotonic() + 10
    while as_user(NOBODY, "nbdinfo", uri).returncode == 0:  # the link ends as it closes
        assert time.monotonic() < deadline, "the link outlived its connection"
        time.sleep(0.05)
    w = site.holder(NOBODY)
    assert w.link("alice.0192", "W")["access"] == "read-write"
    wrote = as_user(NOBODY, "/usr/bin/python3", "-c", WRITE_AS_CLIENT, uri)
    assert wrote.stdout.split("\n")[:2] == ["read-write", "written"], wrote.stderr


def test_non_administrators_get_link_commands_only(site: Site) -> None:
    with pytest.raises(ControlError) as refused:
        site.holder(NOBODY).session.call("halt")
    assert refused.value.errno == 1
    assert any(" WARNING minidisk.daemon.control: control halt refused to " in line
               and f"uid={NOBODY}" in line
               for line in (site.root / "server.log").read_text().splitlines())
    assert site.holder(0).session.call("exports")["exports"]


def test_passwords_through_the_server(site: Site, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("swordfish\n")
    site.cli("directory", "passwd", "alice.0192", "read", "--password-file", str(secret),
             check=True)
    with pytest.raises(ControlError, match="wrong read password"):
        site.holder(NOBODY).link("alice.0192", "R", password="tuna")
    assert site.holder(NOBODY).link("alice.0192", "R", password="swordfish")["why"] == \
        "read password"
    with pytest.raises(ControlError, match="no write password"):  # none set: nobody may
        site.holder(OWNER_UID + 1).link("alice.0192", "W", password="swordfish")
    stored = site.directory().disk(parse_key("alice.0192"))
    assert stored is not None
    assert str(stored.passwords[PasswordClass.READ]).startswith("scrypt$")
    listing = site.cli("directory", "ls", check=True).stdout
    assert "read=set write=none" in listing and "scrypt" not in listing


def _link_cli(site: Site, *args: str) -> linker.LinkState:
    done = site.cli("link", *args)
    assert done.returncode == 0, done.stderr
    return linker.find(args[0])


def test_kill_9_releases_the_link(site: Site) -> None:
    _grant(site, "root", "alice.0192", "W")
    _grant(site, "nobody", "alice.0192", "W")
    state = _link_cli(site, "alice.0192", "--no-attach", "--mode", "W")
    assert state.keeper is not None and state.keeper.alive()
    with pytest.raises(ControlError, match="linked W by uid:0"):
        site.holder(NOBODY).link("alice.0192", "W")
    os.kill(state.keeper.pid, signal.SIGKILL)
    site.wait_linkable("alice.0192", "W")
    assert ("uid:0", "unlink", "alice.0192", "unlinked",
            "the holder's connection closed") in site.audit()
    assert site.cli("unlink", "alice.0192").returncode == 0  # the state left behind


@pytest.mark.kernel
def test_read_link_mounts_read_only(site: Site) -> None:
    _grant(site, "root", "alice.0191", "W")
    mnt = site.root / "mnt"
    state = _link_cli(site, "alice.0191", str(mnt), "--mode", "RR")
    assert (mnt / "hello.txt").read_text() == "hello from alice's 0191\n"
    with pytest.raises(OSError) as e:
        (mnt / "new").write_text("x")
    assert e.value.errno == 30  # EROFS
    assert state.read_only and "ro" in _mount_options(mnt)
    done = site.cli("unlink", str(mnt))
    assert done.returncode == 0, done.stderr
    assert not kernel_mount.mounted_at(mnt) and not attachments() and not linker.links()


@pytest.mark.kernel
def test_unlink_resumes_after_a_halfway_failure(site: Site) -> None:
    _grant(site, "root", "alice.0191", "W")
    _grant(site, "nobody", "alice.0191", "W")
    mnt = site.root / "mnt"
    _link_cli(site, "alice.0191", str(mnt), "--mode", "W")
    (mnt / "written").write_text("by root\n")
    busy = subprocess.Popen(["sleep", "60"], cwd=mnt)  # keeps the mount busy
    try:
        failed = site.cli("unlink", "alice.0191")
        assert failed.returncode == 1 and "umount" in failed.stderr, failed.stderr
        state = linker.find("alice.0191")  # nothing undone out of order: still linked
        assert kernel_mount.mounted_at(mnt) and state.device
        assert state.keeper is not None and state.keeper.alive()
        with pytest.raises(ControlError, match="linked W by uid:0"):
            site.holder(NOBODY).link("alice.0191", "R")
    finally:
        busy.kill()
        busy.wait()
    done = site.cli("unlink", "alice.0191")
    assert done.returncode == 0, done.stderr
    assert not kernel_mount.mounted_at(mnt) and not attachments() and not linker.links()
    site.wait_linkable("alice.0191", "W")


def test_link_refusal_undoes_everything(site: Site) -> None:
    done = site.cli("link", "alice.0192", "--no-attach", "--mode", "W")
    assert done.returncode == 1 and "no grant" in done.stderr
    assert not linker.links()


def _mount_options(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                return fields[5].split(",")
    return []


def test_link_state_is_json(site: Site) -> None:
    _grant(site, "root", "alice.0192", "R")
    _link_cli(site, "alice.0192", "--no-attach")
    raw = json.loads((linker.state_dir() / "alice.0192.json").read_text())
    assert raw["mode"] == "R" and raw["access"] == "read-only"
