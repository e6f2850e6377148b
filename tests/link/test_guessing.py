"""Password guessing neither stalls the server nor fills the audit log (issue 10, item 6):
scrypt and SQLite run off the event loop, refused requests are rate-limited per principal,
and the refusals the limit answers are counted in one audit row, not one row each."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from tests.link.link_helpers import NOBODY, OWNER_UID, Site, as_uid
from tests.nbd.nbd_helpers import RawClient

from minidisk.control_client import ControlError

pytestmark = pytest.mark.timeout(180)

GUESSES = 40


class ReadLoop:
    """The owner reading 4 KiB of alice/0192 again and again on its own data connection."""

    def __init__(self, site: Site) -> None:
        with as_uid(OWNER_UID):
            self.client = RawClient(site.socket)
        self.client.handshake()
        self.client.go("alice/0192")
        self.done = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.client.read(0, 4096)
            self.done += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()


def test_guessing_a_password_stalls_nobody_and_is_rate_limited(site: Site,
                                                                tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("swordfish\n")
    site.cli("directory", "passwd", "alice.0192", "read", "--password-file", str(secret),
             check=True)
    rows_before = len(site.audit())
    reads = ReadLoop(site)
    guesser = site.holder(NOBODY)
    checked: list[int] = []  # reads the owner completed while each guess was being checked
    limited: list[str] = []
    try:
        for n in range(GUESSES):
            before = reads.done
            try:
                guesser.link("alice.0192", "R", password=f"guess-{n}")
                raise AssertionError(f"guess-{n} was taken for the password")
            except ControlError as e:
                after = reads.done
                if e.errno == 13:  # EACCES: the password was checked, and wrong
                    assert "wrong read password" in str(e)
                    checked.append(after - before)
                else:
                    assert e.errno == 11, e  # EAGAIN: the rate limit, before any check
                    limited.append(str(e))
    finally:
        reads.close()
    assert checked and sum(checked) >= 10 * len(checked), \
        f"reads done while each password was checked: {checked}"
    assert limited and len(checked) <= 6, (len(checked), len(limited))
    assert f"too many refused link requests from uid:{NOBODY}" in limited[-1]
    rows = [row for row in site.audit()[rows_before:] if row[0] == f"uid:{NOBODY}"]
    assert len(rows) <= len(checked) + 1, rows
    assert "rate limit" in rows[-1][4]
    # The owner is nobody's guess: it links at once all the while.
    assert site.holder(OWNER_UID).link("alice.0192", "R")["why"] == "owner"


def test_conflicts_are_not_slowed_down_but_audited_once(site: Site) -> None:
    """A linker told again and again that someone else holds the disk is answered each time
    (a conflict is no guess), but the same refusal gets one audit row, not one each."""
    disk = "alice.0100"  # a matrix disk: root and nobody may link it in every mode
    site.holder(0).link(disk, "W")
    rows_before = len(site.audit())
    for _ in range(20):
        with pytest.raises(ControlError) as refused:
            site.holder(NOBODY).link(disk, "W")
        assert refused.value.errno == 16, refused.value  # EBUSY, never the rate limit
    rows = [row for row in site.audit()[rows_before:] if row[0] == f"uid:{NOBODY}"]
    assert len(rows) == 1, rows
