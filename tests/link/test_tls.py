"""Two TLS identities on one machine: linking by certificate subject over TCP with
--tls=require (the `tls_site` fixture: alice owns the disks, bob and carol link, ops is the
one --admin-subject)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from tests.harness import MINIDISK, SYSTEM_PYTHON
from tests.link.link_helpers import (
    WRITE_AS_CLIENT,
    Site,
    autofs_mounted,
    mount_options,
    run_ls,
    running_automounter,
    second_link_outcome,
)
from tests.pki import subject

from minidisk import control_client
from minidisk.control_client import ControlError
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.state import attachments
from minidisk.link import linker
from minidisk.nbd.tls import client_context

pytestmark = pytest.mark.timeout(120)

BOB = f"subject:{subject('bob')}"
CAROL = f"subject:{subject('carol')}"




def _grant(site: Site, who: str, disk: str, mode: str) -> None:
    site.grant(subject(who), disk, mode)


def _nbdinfo(site: Site, export: str, who: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", site.uri(export, who)], capture_output=True, text=True,
                          timeout=30)


def _client(site: Site, export: str, who: str) -> tuple[list[str], str]:
    """(what libnbd saw: read-only/read-write, and what became of a WRITE), stderr."""
    done = subprocess.run([SYSTEM_PYTHON, "-c", WRITE_AS_CLIENT, site.uri(export, who)],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.split("\n")[:2], done.stderr


def test_grant_admits_one_subject_and_refuses_the_other(tls_site: Site) -> None:
    site = tls_site
    _grant(site, "bob", "alice.0192", "R")
    linked = site.tls_holder("bob").link("alice.0192", "R")
    assert linked["principal"] == BOB and linked["access"] == "read-only"
    with pytest.raises(ControlError) as refused:
        site.tls_holder("carol").link("alice.0192", "R")
    assert refused.value.errno == 13 and "no grant" in str(refused.value)
    assert (CAROL, "link", "alice.0192", "refused",
            f"{CAROL} has no grant on alice.0192 and it has no read password: "
            "ask its administrator") in site.audit()
    assert (BOB, "link", "alice.0192", "linked", "grant R") in site.audit()
    # A TLS client without a certificate is nobody: it may not even ask.
    with pytest.raises(ControlError) as anonymous:
        control_client.call(site.url, "link", {"disk": "alice.0192", "mode": "R"},
                     tls=client_context(str(site.pki["anonymous"])), timeout=30)
    assert anonymous.value.errno == 1


def test_raw_nbdinfo_with_a_certificate_needs_a_live_link(tls_site: Site) -> None:
    site = tls_site
    _grant(site, "bob", "alice.0192", "W")
    refused = _nbdinfo(site, "alice/0192", "bob")  # a valid certificate, no link
    assert refused.returncode == 1, refused.stdout
    assert "Operation not supported for export" in refused.stderr, refused.stderr  # libnbd 1.14
    assert _nbdinfo(site, "alice/0192", "alice").returncode == 0  # the owner, always
    listed = subprocess.run(["nbdinfo", "--list", site.uri("", "carol")], capture_output=True,
                            text=True, timeout=30)
    assert "alice/0192" not in listed.stdout
    holder = site.tls_holder("bob")
    holder.link("alice.0192", "R")
    read_only, stderr = _client(site, "alice/0192", "bob")
    assert read_only == ["read-only", "refused EPERM"], stderr
    # The link is bob's: carol's certificate still opens nothing.
    assert _nbdinfo(site, "alice/0192", "carol").returncode == 1
    holder.close()
    deadline = time.monotonic() + 10
    while _nbdinfo(site, "alice/0192", "bob").returncode == 0:  # ends with its connection
        assert time.monotonic() < deadline, "the link outlived its connection"
        time.sleep(0.05)
    site.tls_holder("bob").link("alice.0192", "W")
    written, stderr = _client(site, "alice/0192", "bob")
    assert written == ["read-write", "written"], stderr


# (bob's link, carol's request, z/VM's answer for carol: write, read (degraded) or refused)
PAIRS = [
    ("R", "R", "read"),
    ("W", "R", "refused"),
    ("W", "RR", "read"),
    ("R", "WR", "read"),
    ("R", "M", "write"),
    ("M", "MW", "write"),
    ("SR", "MW", "refused"),
    ("EW", "RR", "refused"),
]


def test_mode_pairs_between_two_subjects(tls_site: Site) -> None:
    site = tls_site
    wrong = []
    for n, (first, second, expected) in enumerate(PAIRS):
        disk = f"alice.{0x100 + n:04x}"  # a matrix disk: bob and carol hold MW grants
        bob, carol = site.tls_holder("bob"), site.tls_holder("carol")
        bob.link(disk, first)
        got = second_link_outcome(carol, disk, first, second, BOB)
        if got != expected:
            wrong.append((first, second, got, expected))
        bob.close()
        carol.close()
    assert not wrong


def _link_cli(site: Site, who: str, *args: str) -> subprocess.CompletedProcess[str]:
    return site.cli("link", *args, "--tls-certificates", str(site.pki[who]))


@pytest.mark.kernel
def test_link_command_attaches_through_nbdfuse_with_tls(tls_site: Site) -> None:
    site = tls_site
    _grant(site, "bob", "alice.0191", "W")
    _grant(site, "carol", "alice.0191", "W")
    mnt = site.root / "mnt"
    done = _link_cli(site, "bob", "alice.0191", str(mnt), "--mode", "R")
    assert done.returncode == 0, done.stderr
    assert "alice.0191 linked R (read-only)" in done.stdout
    assert (mnt / "hello.txt").read_text() == "hello from alice's 0191\n"
    [attachment] = attachments()
    assert attachment.method == "nbdfuse" and attachment.read_only
    assert attachment.uri.startswith(f"nbds://127.0.0.1:{site.url.rsplit(':', 1)[1]}/"
                                     "alice/0191?tls-certificates=")
    with pytest.raises(OSError) as e:
        (mnt / "new").write_text("x")
    assert e.value.errno == 30  # EROFS
    with pytest.raises(ControlError, match=f"linked R by {BOB}"):
        site.tls_holder("carol").link("alice.0191", "W")
    done = site.cli("unlink", str(mnt))
    assert done.returncode == 0, done.stderr
    assert not kernel_mount.mounted_at(mnt) and not attachments() and not linker.links()
    site.tls_holder("carol").link("alice.0191", "W")  # bob's link (and lock) are gone


def test_killing_the_keeper_ends_the_link(tls_site: Site) -> None:
    site = tls_site
    _grant(site, "bob", "alice.0192", "W")
    _grant(site, "carol", "alice.0192", "W")
    done = _link_cli(site, "bob", "alice.0192", "--no-attach", "--mode", "W")
    assert done.returncode == 0, done.stderr
    uri = done.stdout.splitlines()[-1]
    assert uri.startswith("nbds://127.0.0.1:") and "tls-certificates=" in uri
    state = linker.find("alice.0192")
    assert state.keeper is not None and state.keeper.alive()
    with pytest.raises(ControlError, match=f"linked W by {BOB}"):
        site.tls_holder("carol").link("alice.0192", "R")
    os.kill(state.keeper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            site.tls_holder("carol").link("alice.0192", "W")
            break
        except ControlError:
            assert time.monotonic() < deadline, "bob's link outlived its keeper"
            time.sleep(0.05)
    assert (BOB, "unlink", "alice.0192", "unlinked",
            "the holder's connection closed") in site.audit()
    assert _nbdinfo(site, "alice/0192", "bob").returncode == 1
    assert site.cli("unlink", "alice.0192").returncode == 0  # the state left behind


def test_a_users_certificate_is_no_administrator(tls_site: Site) -> None:
    site = tls_site
    env = {**os.environ, **site.env}
    for who in ("bob", "alice"):  # a linker, and even the owner of every disk here
        with pytest.raises(ControlError) as refused:
            control_client.call(site.url, "halt", tls=client_context(str(site.pki[who])),
                                timeout=30)
        assert refused.value.errno == 1 and "administrators only" in str(refused.value)
    bob_halt = subprocess.run(
        [MINIDISK, "halt"], capture_output=True, text=True, timeout=60,
        env={**env, "MINIDISK_TLS_CERTIFICATES": str(site.pki["bob"])})
    assert bob_halt.returncode == 1 and "administrators only" in bob_halt.stderr
    assert control_client.call(site.url, "exports", tls=client_context(str(site.pki["ops"])))
    ops_halt = subprocess.run(
        [MINIDISK, "halt"], capture_output=True, text=True, timeout=60,
        env={**env, "MINIDISK_TLS_CERTIFICATES": str(site.pki["ops"])})
    assert ops_halt.returncode == 0, ops_halt.stderr



def test_certificates_from_the_environment(tls_site: Site) -> None:
    """$MINIDISK_TLS_CERTIFICATES (what control commands use) serves `link` too: the data
    URI is nbds with the same certificates, not a plain one the server would refuse."""
    site = tls_site
    _grant(site, "bob", "alice.0192", "R")
    _grant(site, "carol", "alice.0192", "W")
    done = subprocess.run([MINIDISK, "link", "alice.0192", "--no-attach"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **site.env,
                                                      "MINIDISK_TLS_CERTIFICATES": str(
                                                          site.pki["bob"])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == site.uri("alice/0192", "bob")
    with pytest.raises(ControlError, match=f"linked R by {BOB}"):
        site.tls_holder("carol").link("alice.0192", "W")
    assert site.cli("unlink", "alice.0192").returncode == 0


@pytest.mark.kernel
@pytest.mark.autofs
def test_automount_with_a_certificate(tls_site: Site) -> None:
    site = tls_site
    _grant(site, "bob", "alice.0191", "R")
    _grant(site, "carol", "alice.0191", "W")
    with running_automounter(site, MINIDISK_TLS_CERTIFICATES=str(site.pki["bob"])) as (_, root):
        listed = run_ls(root / "root" / "alice.0191")  # root's subtree, bob's certificate
        assert listed.returncode == 0 and "hello.txt" in listed.stdout, listed.stderr
        assert "ro" in mount_options(root / "root" / "alice.0191")
        [attachment] = attachments()
        assert attachment.method == "nbdfuse" and attachment.uri.startswith("nbds://")
        with pytest.raises(ControlError, match=f"linked R by {BOB}"):
            site.tls_holder("carol").link("alice.0191", "W")
    assert not autofs_mounted(root) and not attachments() and not linker.links()
    site.tls_holder("carol").link("alice.0191", "W")


def test_a_subject_spelled_inside_a_common_name_is_someone_else(tls_site: Site) -> None:
    """CN="alice,O=minidisk tests" (and nothing else) is not CN=alice,O=minidisk tests: the
    server escapes RFC 4514's specials, so no certificate can pass for another subject."""
    site = tls_site
    fake = f"subject:{subject('alice').replace(',', chr(92) + ',')}"
    assert fake == "subject:CN=alice\\,O=minidisk tests"
    refused = _nbdinfo(site, "alice/0192", "fake-alice")  # not the owner: no access
    assert refused.returncode == 1 and "certificate" not in refused.stderr, refused.stderr
    with pytest.raises(ControlError) as no_grant:
        site.tls_holder("fake-alice").link("alice.0192", "W")
    assert no_grant.value.errno == 13 and f"{fake} has no grant" in str(no_grant.value)
    with pytest.raises(ControlError) as not_admin:  # nor is "ops,O=..." an administrator
        control_client.call(site.url, "halt", tls=client_context(str(site.pki["fake-ops"])),
                     timeout=30)
    assert not_admin.value.errno == 1
    assert _nbdinfo(site, "alice/0192", "alice").returncode == 0  # the real one still is
