"""`/vmlink` links as the user who looked, and only that user gets in (issue 10, item 2).

Real autofs, real unprivileged uids (setpriv): a lookup is authorized for the uid that made
it, the link is made with that uid (the server's audit log names it), and the mount sits in
that user's 0700 subtree, so another uid reads nothing of it — with a grant of its own it gets
its own link in its own subtree; without one, ENOENT.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.link.link_helpers import Site, as_user, mount_options, running_automounter

from minidisk.kernel.state import attachments
from minidisk.link import linker

pytestmark = [pytest.mark.kernel, pytest.mark.autofs, pytest.mark.timeout(180)]

ALICE_READER = 60001  # granted R on alice.0191
BOB_READER = 60002  # granted R on alice.0191 too
NO_GRANT = 60003  # granted nothing


@pytest.fixture
def users_automounter(site: Site) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The automounter with root granted R (what made /vmlink anyone's before), two users
    granted R, and a third with no grant."""
    for who in ("root", f"uid:{ALICE_READER}", f"uid:{BOB_READER}"):
        site.grant(who, "alice.0191", "R")
    with running_automounter(site, timeout=60) as running:
        yield running


def linked_by(site: Site) -> set[str]:
    return {who for who, action, _, outcome, _ in site.audit()
            if action == "link" and outcome == "linked"}


def refused(done: subprocess.CompletedProcess[str], why: str) -> bool:
    return done.returncode != 0 and why in done.stderr and "hello" not in done.stdout


def test_a_user_without_a_grant_reads_nothing(
        site: Site, users_automounter: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, root = users_automounter
    # Before: the automounter linked with root's grant for anyone who typed the name.
    shared = as_user(NO_GRANT, "cat", str(root / "alice.0191" / "hello.txt"))
    assert refused(shared, "No such file or directory"), shared
    own = as_user(NO_GRANT, "cat", str(root / str(NO_GRANT) / "alice.0191" / "hello.txt"))
    assert refused(own, "No such file or directory"), own
    # Someone else's subtree that does not exist yet is not for this uid to make.
    other = as_user(NO_GRANT, "stat", str(root / str(ALICE_READER)))
    assert refused(other, "No such file or directory"), other
    assert linked_by(site) == set()
    assert not attachments() and not linker.links()


def test_the_link_is_the_users_and_only_that_user_reads_it(
        site: Site, users_automounter: tuple[subprocess.Popen[bytes], Path]) -> None:
    _, root = users_automounter
    alice_path = root / str(ALICE_READER) / "alice.0191"
    done = as_user(ALICE_READER, "cat", str(alice_path / "hello.txt"))
    assert done.returncode == 0 and "hello from alice's 0191" in done.stdout, done.stderr
    assert linked_by(site) == {f"uid:{ALICE_READER}"}  # made as that user, not as root
    assert "ro" in mount_options(alice_path)  # R grant: a read link, mounted ro
    for intruder in (BOB_READER, NO_GRANT):
        into = as_user(intruder, "cat", str(alice_path / "hello.txt"))
        assert refused(into, "Permission denied"), into
        listing = as_user(intruder, "ls", str(root / str(ALICE_READER)))
        assert refused(listing, "Permission denied"), listing
    # A grant of one's own: one's own link, in one's own subtree.
    bob_path = root / str(BOB_READER) / "alice.0191"
    mine = as_user(BOB_READER, "cat", str(bob_path / "hello.txt"))
    assert mine.returncode == 0 and "hello from alice's 0191" in mine.stdout, mine.stderr
    assert linked_by(site) == {f"uid:{ALICE_READER}", f"uid:{BOB_READER}"}
    assert sorted(s.id for s in linker.links()) == [f"alice.0191.uid{ALICE_READER}",
                                                     f"alice.0191.uid{BOB_READER}"]
    assert len(attachments()) == 2
    # Root looking into a user's subtree is not that user: no link is made for it there.
    by_root = subprocess.run(["stat", str(root / str(ALICE_READER) / "alice.0192")],
                             capture_output=True, text=True, timeout=60)
    assert by_root.returncode != 0 and len(linker.links()) == 2


def test_a_login_names_its_subtree(
        site: Site, users_automounter: tuple[subprocess.Popen[bytes], Path]) -> None:
    """A uid with a passwd entry is found under its login: root's lookup links with root's
    grant at /vmlink/root, and /vmlink/<uid> is not another way in."""
    _, root = users_automounter
    done = subprocess.run(["cat", str(root / "root" / "alice.0191" / "hello.txt")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "hello" in done.stdout, done.stderr
    assert linked_by(site) == {"uid:0"}
    by_number = subprocess.run(["stat", str(root / "0")], capture_output=True, text=True,
                               timeout=60)
    assert by_number.returncode != 0
    assert [s.id for s in linker.links()] == ["alice.0191.uid0"]
