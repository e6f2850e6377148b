"""Link admission is one atomic step per disk, and a link takes the data connections it
admitted with it (issue 10, item 3)."""

from __future__ import annotations

import threading
import time

import pytest
from tests.link.link_helpers import NOBODY, OWNER_UID, Holder, Site, as_uid
from tests.nbd.nbd_helpers import Closed, RawClient

from minidisk.control_client import ControlError
from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(180)

OTHER = OWNER_UID + 1  # a second linker, uid 1001
ROUNDS = 30


def _race(site: Site, disk: str, modes: tuple[str, str], lag: float) -> list[str | None]:
    """Two control connections of NOBODY ask for `modes` on `disk`, the second `lag` seconds
    after the first (an attacker tries every lag); what each got (the mode, or None if
    refused). The holders stay open (the links live on)."""
    holders = [site.holder(NOBODY) for _ in modes]
    got: list[str | None] = [None] * len(modes)
    start = threading.Barrier(len(modes))

    def ask(i: int) -> None:
        start.wait()
        if i:
            time.sleep(lag)
        try:
            holders[i].link(disk, modes[i])
            got[i] = modes[i]
        except ControlError:
            pass

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(modes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def _lag(attempt: int) -> float:
    """0 to 6 ms in 0.2 ms steps: somewhere in there the first request is between its lock
    and its registration."""
    return (attempt % 30) * 0.0002


def _unlinked(site: Site, holders: list[Holder]) -> None:
    """Close `holders` and wait until NOBODY holds no link (each ends as its holder closes)."""
    for h in holders:
        h.close()
    site.holders = [h for h in site.holders if h not in holders]
    probe = Holder(site.url, NOBODY)
    try:
        deadline = time.monotonic() + 10
        while probe.session.call("links")["links"]:
            assert time.monotonic() < deadline, "a closed holder's link did not end"
            time.sleep(0.02)
    finally:
        probe.close()


def test_one_principal_racing_w_and_rr_never_gets_both(site: Site) -> None:
    site.cli("directory", "grant", "nobody", "alice.0192", "--mode", "W", check=True)
    both = 0
    one = 0
    for attempt in range(ROUNDS):
        got = _race(site, "alice.0192", ("W", "RR"), _lag(attempt))
        both += None not in got
        one += got.count(None) == 1
        _unlinked(site, site.holders[-2:])
    assert both == 0, f"{both} of {ROUNDS} rounds admitted W and RR for one principal"
    assert one == ROUNDS  # and always exactly one of them


def _writer(site: Site, uid: int) -> RawClient:
    with as_uid(uid):
        client = RawClient(site.socket)
    client.handshake()
    _, tflags = client.go("alice/0192")
    assert not tflags & p.TFLAG_READ_ONLY
    return client


def _writes(client: RawClient) -> bool:
    """One 512-byte WRITE: True if the server wrote it."""
    try:
        return client.request(p.CMD_WRITE, 0, 512, payload=b"w" * 512).errno == 0
    except (Closed, OSError):
        return False


def test_a_writer_dies_with_its_w_link_before_anyone_else_links(site: Site) -> None:
    """NOBODY links W (racing an RR link of its own beside it, which must not keep anything
    alive), opens a read-write data connection and writes; the W link ends; uid 1001 links
    R. From then on that data connection must not write a byte."""
    site.cli("directory", "grant", "nobody", "alice.0192", "--mode", "W", check=True)
    site.cli("directory", "grant", f"uid:{OTHER}", "alice.0192", "--mode", "R", check=True)
    # Until the W link is admitted; for ten rounds, only together with the RR link beside it
    # (the state an atomic admission never reaches).
    for attempt in range(ROUNDS):
        got = _race(site, "alice.0192", ("W", "RR"), _lag(attempt))
        if got[0] == "W" and (got[1] == "RR" or attempt >= 10):
            break
        _unlinked(site, site.holders[-2:])
    else:
        raise AssertionError(f"W was never admitted in {ROUNDS} rounds")
    w_holder = site.holders[-2]
    writer = _writer(site, NOBODY)
    try:
        assert _writes(writer)
        w_holder.close()  # the W link ends
        reader = site.wait_linkable("alice.0192", "R", uid=OTHER)
        assert reader.session.call("links")["links"][0]["mode"] == "R"
        assert not _writes(writer), "a data connection of an ended W link still writes"
    finally:
        writer.close()
