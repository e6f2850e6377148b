"""A link lives only as long as its holder renews its lease (issue 10, item 5): a holder
whose host vanished (here: a keeper stopped with SIGSTOP) loses the link, its lock and its
data connections when the lease runs out; the keeper, once it runs again, finds its link
gone and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tests.harness import stop_process
from tests.link.link_helpers import LEASE, NOBODY, Site
from tests.nbd.nbd_helpers import Closed, RawClient

from minidisk.control_client import ControlError
from minidisk.link.keeper import EXIT_LINK_LOST
from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(120)


def _writes(client: RawClient) -> bool:
    try:
        return client.request(p.CMD_WRITE, 0, 512, payload=b"k" * 512).errno == 0
    except (Closed, OSError):
        return False


def test_a_stopped_keeper_loses_its_link_when_the_lease_runs_out(leased_site: Site) -> None:
    site = leased_site
    site.cli("directory", "grant", "root", "alice.0192", "--mode", "W", check=True)
    site.cli("directory", "grant", "nobody", "alice.0192", "--mode", "W", check=True)
    keeper = subprocess.Popen(
        [sys.executable, "-m", "minidisk.link.keeper", "--server", site.url,
         "--disk", "alice.0192", "--mode", "W"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout is not None and keeper.stderr is not None
        answer = json.loads(keeper.stdout.readline())
        assert answer["ok"] and answer["lease"] == LEASE, answer
        client = RawClient(site.socket)  # root's data connection, admitted by the link
        client.handshake()
        client.go("alice/0192")
        assert _writes(client)
        time.sleep(3 * LEASE)  # renewed all the while: still linked
        with pytest.raises(ControlError, match="linked W by uid:0"):
            site.holder(NOBODY).link("alice.0192", "R")
        os.kill(keeper.pid, signal.SIGSTOP)  # the holder's host "vanishes"
        site.wait_linkable("alice.0192", "W", timeout=20 * LEASE).close()
        assert not _writes(client), "the expired link's data connection still writes"
        client.close()
        ends = [row for row in site.audit() if row[:2] == ("uid:0", "unlink")]
        assert ends and "lease" in ends[-1][4], ends
        os.kill(keeper.pid, signal.SIGCONT)
        assert keeper.wait(timeout=10 * LEASE) == EXIT_LINK_LOST
        message = keeper.stderr.read()
        assert "the link of alice.0192 is gone" in message, message
    finally:
        if keeper.poll() is None:
            os.kill(keeper.pid, signal.SIGCONT)
        stop_process(keeper)
