"""Kernel nbd, proven in a guest: minidisk's server and `minidisk attach` over a unix socket,
row by row against Debian's nbd-client attaching the same exports in the same boot.

One boot runs guest/nbd_battery.sh for both attach methods (netlink, ioctl); each test reads
the rows of one method.
"""

from __future__ import annotations

import re

import pytest
from tests.vm.harness import Boot, Rows, guest_script

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

EXPORT_SIZE = 128 << 20
QUEUE = ("logical_block_size", "physical_block_size", "minimum_io_size", "optimal_io_size",
         "max_hw_sectors_kb", "max_segments", "discard_granularity", "discard_max_hw_bytes",
         "write_zeroes_max_bytes", "write_cache", "fua", "rotational", "nr_requests")


METHODS = ("netlink", "ioctl")
THEIRS = "/dev/nbd15"  # the device nbd-client attaches in the guest


@pytest.fixture(scope="module")
def battery(boot: Boot) -> Rows:
    return Rows(boot("nbd-battery", guest_script("nbd_battery.sh", *METHODS), python=True))


class MethodRows:
    """The battery's rows of one attach method: rows["ours.size"] is "netlink.ours.size";
    nbd-client's rows ("theirs…") are the same for both."""

    def __init__(self, rows: Rows, method: str) -> None:
        self.rows, self.method = rows, method

    def _name(self, name: str) -> str:
        return name if name.startswith("theirs") else f"{self.method}.{name}"

    def __getitem__(self, name: str) -> str:
        return self.rows[self._name(name)]

    def status(self, name: str) -> int:
        return self.rows.status(self._name(name))

    def error(self, name: str) -> str:
        return self.rows.error(self._name(name))


@pytest.fixture(params=METHODS)
def rows(request: pytest.FixtureRequest, battery: Rows) -> MethodRows:
    return MethodRows(battery, request.param)


def ok(rows: MethodRows | Rows, *names: str) -> None:
    """Each named check exited 0; else show what it printed."""
    for name in names:
        assert rows.status(name) == 0, f"{name}: {rows.error(name)}"


def test_attach_gives_a_device(rows: MethodRows) -> None:
    ok(rows.rows, "serve", "serve_ro")
    ok(rows, "ours.attach", "theirs.attach")
    assert re.fullmatch(r"/dev/nbd\d+", rows["ours.attach.out"])


def test_size(rows: MethodRows) -> None:
    assert rows["ours.size"] == rows["theirs.size"] == str(EXPORT_SIZE)


@pytest.mark.parametrize("limit", QUEUE)
def test_queue_limits_as_nbd_client(rows: MethodRows, limit: str) -> None:
    """The memory export's minimum block size is 1, so 512-byte sectors as nbd-client's."""
    assert rows[f"ours.queue.{limit}"] == rows[f"theirs.queue.{limit}"]


def test_direct_io_of_one_sector(rows: MethodRows) -> None:
    ok(rows, "ours.dio512_write", "ours.dio512_read")


def test_data_round_trip(rows: MethodRows) -> None:
    ok(rows, "ours.write", "ours.readback")


def test_flush_fua_and_discard_reach_the_device(rows: MethodRows) -> None:
    """The kernel issued a flush (FF), a FUA write (W…F…) and a discard (D) to our device."""
    ok(rows, "ours.requests")
    kinds = set(rows["ours.requests"].split())
    assert "FF" in kinds
    assert any(re.fullmatch(r"W[A-Z]*F[A-Z]*", k) for k in kinds), kinds
    assert any(k.startswith("D") for k in kinds), kinds
    assert kinds == set(rows["theirs.requests"].split())


def test_ext4_mkfs_mount_fsck(rows: MethodRows) -> None:
    ok(rows, "ours.mkfs", "ours.mount", "ours.fswrite", "ours.umount", "ours.fsck", "ours.fsread")


@pytest.mark.parametrize("case", ["ro_flag", "ro_export"])
def test_read_only(rows: MethodRows, case: str) -> None:
    """`attach --read-only` and a read-only export: reads work, writes fail as nbd-client's."""
    ours, theirs = f"ours_{case}", f"theirs_{case}"
    ok(rows, f"{ours}.attach", f"{ours}.read")
    assert rows[f"{ours}.ro"] == rows[f"{theirs}.ro"] == "1"
    for op in ("write", "discard"):
        assert rows.status(f"{ours}.{op}") != 0
        assert rows.status(f"{ours}.{op}") == rows.status(f"{theirs}.{op}")
        mine = rows.error(f"{ours}.{op}").replace(rows[f"{ours}.attach.out"], "DEV")
        assert mine == rows.error(f"{theirs}.{op}").replace(THEIRS, "DEV")


def test_list_shows_the_attachments(rows: MethodRows) -> None:
    """Device, method, the helper's pid (ioctl's NBD_DO_IT process; none for netlink), URI."""
    ok(rows, "ours.list")
    lines = rows["ours.list.out"].splitlines()
    assert lines[0].split() == ["DEVICE", "METHOD", "PID", "URI"]
    listed = {fields[0]: fields[1:] for fields in (line.split() for line in lines[1:])}
    uris = {"ours": "nbd+unix:///dk?socket=/tmp/md.sock",
            "ours_ro_flag": "nbd+unix:///dk?socket=/tmp/md.sock",
            "ours_ro_export": "nbd+unix:///ro?socket=/tmp/md-ro.sock"}
    assert len(listed) == len(uris)
    for prefix, uri in uris.items():
        method, pid, listed_uri = listed[rows[f"{prefix}.attach.out"]]
        assert (method, listed_uri) == (rows.method, uri)
        assert pid.isdigit() if method == "ioctl" else pid == "-"


def test_detach_leaves_nothing(rows: MethodRows) -> None:
    ok(rows, "ours.detach", "ours_ro_flag.detach", "ours_ro_export.detach")
    for prefix in ("ours", "ours_ro_flag", "ours_ro_export"):
        assert rows[f"{prefix}.pid_after_detach"] == ""  # not connected any more
    assert rows["state_after_detach"] == ""
