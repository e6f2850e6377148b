"""`minidisk dmsetup` against a server: the options scripts written for dmsetup use, and
the exact text they read back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest
from click.testing import CliRunner
from tests.dm.dm_helpers import Server
from tests.harness import MINIDISK

from minidisk.cli.dmsetup import dmsetup

pytestmark = pytest.mark.slow

SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter with libnbd's `nbd` module


def test_target_option_on_table_status_and_ls(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "mixed", stdin="0 8 linear /dev/a 0\n8 8 zero\n16 8 linear /dev/a 8")
    server.dmsetup("create", "zeros", "--table", "0 8 zero")
    server.dmsetup("create", "empty", "--notable")
    assert server.dmsetup("table", "--target", "linear").stdout == \
        "mixed: 0 8 linear 240:0 0\nmixed: 16 8 linear 240:0 8\n"
    assert server.dmsetup("status", "--target", "zero").stdout == \
        "mixed: 8 8 zero \nzeros: 0 8 zero \n"
    assert server.dmsetup("table", "--target", "zero", "mixed").stdout == "8 8 zero \n"
    # a device without such segments prints nothing at all, not an empty line
    assert server.dmsetup("table", "--target", "linear", "zeros").stdout == ""
    assert server.dmsetup("status", "--target", "error").stdout == ""
    # ls --target goes through dmsetup's table code: (major, minor), no tree
    assert server.dmsetup("ls", "--target", "zero").stdout == \
        "mixed\t(253, 0)\nzeros\t(253, 1)\n"
    assert server.dmsetup("ls", "--target", "zero", "--tree").stdout == \
        "mixed\t(253, 0)\nzeros\t(253, 1)\n"
    assert server.dmsetup("ls", "--target", "striped").stdout == ""


def test_devices_chosen_by_uuid_or_number(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "plain", "--table", "0 8 zero")
    server.dmsetup("create", "dust", "-u", "LVM-dust1", "--table", "0 8 dust /dev/a 0 512")
    info = server.dmsetup("info", "-u", "LVM-dust1").stdout
    assert info.startswith("Name:              dust\n") and "UUID: LVM-dust1\n" in info
    assert "Major, minor:      253, 1\n" in info
    assert server.dmsetup("info", "-j", "253", "-m", "1").stdout == info
    # one device chosen: no "name: " prefix, as for a named device
    assert server.dmsetup("table", "-u", "LVM-dust1").stdout == "0 8 dust 240:0 0 512\n"
    assert server.dmsetup("status", "-j", "253", "-m", "0").stdout == "0 8 zero \n"
    assert server.dmsetup("deps", "-u", "LVM-dust1").stdout == "1 dependencies\t: (240, 0)\n"
    # after -u the positional arguments are the command's own
    assert server.dmsetup("message", "-u", "LVM-dust1", "0", "countbadblocks").stdout == \
        "countbadblocks: 0 badblock(s) found\n"
    server.dmsetup("load", "-u", "LVM-dust1", "--table", "0 16 zero")
    server.dmsetup("suspend", "-j", "253", "-m", "1")
    assert "State:             SUSPENDED\n" in server.dmsetup("info", "dust").stdout
    server.dmsetup("resume", "-u", "LVM-dust1")
    assert server.dmsetup("table", "dust").stdout == "0 16 zero \n"
    bad_number = server.dmsetup("wait", "-u", "LVM-dust1", "x", check=False)
    assert bad_number.returncode == 2 and "'x' is not a non-negative integer" in \
        bad_number.stderr
    server.dmsetup("load", "-u", "LVM-dust1", "--table", "0 8 zero")
    server.dmsetup("clear", "-j", "253", "-m", "1")
    assert "Tables present:    LIVE\n" in server.dmsetup("info", "dust").stdout
    # a name still wins over -u
    assert server.dmsetup("table", "-u", "LVM-dust1", "plain").stdout == "0 8 zero \n"
    # failures are dmsetup's
    missing = server.dmsetup("info", "-u", "LVM-none", check=False)
    assert (missing.returncode, missing.stderr) == (
        1, "Device does not exist.\nCommand failed.\n")
    gone = server.dmsetup("remove", "-u", "LVM-none", check=False)
    assert gone.returncode == 1 and gone.stderr.startswith(
        "device-mapper: remove ioctl on UUID LVM-none  failed: No such device or address\n")
    nothing = server.dmsetup("remove", check=False)
    assert (nothing.returncode, nothing.stderr) == (1, "No device specified.\nCommand failed.\n")
    half = server.dmsetup("info", "-j", "253", check=False)
    assert half.returncode == 2 and "-j MAJOR and -m MINOR go together" in half.stderr
    server.dmsetup("remove", "-j", "253", "-m", "1")
    assert server.dmsetup("ls").stdout == "plain\t(253:0)\n"


def test_remove_deferred_waits_for_the_last_nbd_client(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "d", "--table", "0 8 linear /dev/a 0")
    server.dmsetup("create", "closed", "--table", "0 8 zero")
    assert server.dmsetup("remove", "--deferred", "closed").stdout == ""
    assert server.dmsetup("ls").stdout == "d\t(253:0)\n"  # not open: gone at once
    holder = subprocess.Popen(
        [SYSTEM_PYTHON, "-c",
         "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); print('up', flush=True);"
         " sys.stdin.read()", server.uri("/dev/mapper/d")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        busy = server.dmsetup("remove", "d", check=False)
        assert busy.returncode == 1 and "Device or resource busy" in busy.stderr
        assert server.dmsetup("remove", "--deferred", "d").returncode == 0
        info = server.dmsetup("info", "d").stdout
        assert "State:             ACTIVE (DEFERRED REMOVE)\n" in info
        assert "Open count:        1\n" in info
        server.dmsetup("message", "d", "0", "@cancel_deferred_remove")
        assert "State:             ACTIVE\n" in server.dmsetup("info", "d").stdout
        server.dmsetup("remove", "--deferred", "d")
        time.sleep(0.5)
        assert "(DEFERRED REMOVE)" in server.dmsetup("info", "d").stdout  # still open
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the client disconnects
        holder.wait(10)
    deadline = time.monotonic() + 10
    while server.dmsetup("ls").stdout != "No devices found\n":
        assert time.monotonic() < deadline, "the deferred removal never happened"
        time.sleep(0.1)


def test_udev_flags_and_commands_are_harmless(serve: Callable[..., Server]) -> None:
    runner = CliRunner()
    cookies = runner.invoke(dmsetup, ["udevcookies"])
    assert (cookies.exit_code, cookies.output) == (
        0, "Cookie       Semid      Value      Last semop time           Last change time\n")
    for args in (["udevcomplete_all"], ["udevcomplete_all", "-y", "10"]):
        done = runner.invoke(dmsetup, args)
        assert (done.exit_code, done.output) == (
            0, "0 semaphores with keys prefixed by 3405 (0xd4d) destroyed. 0 skipped.\n")
    assert runner.invoke(dmsetup, ["--noudevsync", "mknodes", "--verifyudev"]).output == ""
    assert "there is no udev here" in runner.invoke(dmsetup, ["remove", "--help"]).output
    # the flags go before or after the command, on any command, and change nothing
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("--noudevsync", "create", "d", "--noudevrules", "--table", "0 8 zero")
    assert server.dmsetup("--verifyudev", "table", "d", "--noudevsync").stdout == "0 8 zero \n"
    server.dmsetup("remove", "--noudevsync", "--noudevrules", "--verifyudev", "d")
    assert server.dmsetup("ls", "--noudevsync").stdout == "No devices found\n"


def test_remove_retry_waits_for_a_busy_device(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "low", "--table", "0 8 linear /dev/a 0")
    server.dmsetup("create", "top", "--table", "0 8 linear /dev/mapper/low 0")
    busy = server.dmsetup("remove", "low", check=False)
    assert busy.returncode == 1 and "Device or resource busy" in busy.stderr
    retrying = subprocess.Popen([MINIDISK, "dmsetup", "--server", server.url, "remove",
                                 "--retry", "low"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert retrying.poll() is None  # still trying: it retries for ~5 s
        server.dmsetup("remove", "top")  # lets go of low
        _, err = retrying.communicate(timeout=30)
    finally:
        if retrying.poll() is None:
            retrying.kill()
            retrying.wait()
    assert retrying.returncode == 0, err
    assert server.dmsetup("ls").stdout == "No devices found\n"


def test_info_columns_with_fields_separators_and_prefixes(serve: Callable[..., Server]) -> None:
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "x", "--table", "0 8 linear /dev/a 0")
    server.dmsetup("create", "vg-lv", "-u", "LVM-abc", "--table", "0 8 zero")
    server.dmsetup("suspend", "vg-lv")
    # the classic default, aligned, numbers right-aligned under their headings
    assert server.dmsetup("info", "-c").stdout == (
        # every column padded, the last too, as libdm does
        "Name             Maj Min Stat Open Targ Event  UUID                            \n"
        "vg-lv            253   1 L-sw    0    1      0 LVM-abc                         \n"
        "x                253   0 L--w    0    1      0                                 \n")
    # --noheadings alone: dmsetup's old unaligned form, ':' between fields
    assert server.dmsetup("info", "-c", "--noheadings", "-o", "name,uuid,open").stdout == \
        "vg-lv:LVM-abc:0\nx::0\n"
    assert server.dmsetup("info", "-c", "--noheadings", "--separator", ",", "-o",
                          "name,devno,suspended,readonly,tables_loaded").stdout == \
        "vg-lv,253:1,Suspended,Writeable,Live\nx,253:0,Active,Writeable,Live\n"
    added = server.dmsetup("info", "-C", "-o", "+devno", "x").stdout.splitlines()
    assert added[0].endswith("UUID                             DevNo")  # libdm: width 5
    assert added[1].split() == ["x", "253", "0", "L--w", "0", "1", "0", "253:0"]
    # with headings (as libdm: a plain heading line first)
    assert server.dmsetup("info", "-c", "--nameprefixes", "-o", "name,attr", "x").stdout == \
        "Name Stat\nDM_NAME='x' DM_ATTR='L--w'\n"
    assert server.dmsetup("info", "-c", "--nameprefixes", "--unquoted", "--noheadings",
                          "-o", "name,events", "x").stdout == "DM_NAME=x:DM_EVENTS=0\n"
    listing = server.dmsetup("info", "-c", "-o", "help").stderr  # libdm's: on stderr
    assert "  segments" in listing and "  attr" in listing
    bad = server.dmsetup("info", "-c", "-o", "name,bogus", check=False)
    # libdm: the field list, then the field it does not know (no "Command failed.")
    assert bad.returncode == 1 and bad.stderr.startswith(listing)
    assert bad.stderr.endswith("\nUnrecognised field: bogus\n")


def test_halt_with_a_suspended_device_returns(serve: Callable[..., Server]) -> None:
    """A suspended device would hold halt's flush until a resume that never comes: halt
    skips it (its children are flushed as keys of their own) and the server stops."""
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "x", "--table", "0 8 linear /dev/a 0")
    server.dmsetup("suspend", "x")
    done = subprocess.run([MINIDISK, "halt", "--force", server.url], capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert server.proc.wait(30) == 0


def test_halt_fails_requests_queued_on_a_suspended_device(serve: Callable[..., Server]) -> None:
    """A client's read waits on a suspended device; halt must not wait for a resume that
    will never come: the read fails and the server exits (well before its 30 s drain)."""
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "x", "--table", "0 8 linear /dev/a 0")
    server.dmsetup("suspend", "x")
    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read 0 512",
                               server.uri("/dev/mapper/x")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        assert reader.poll() is None  # queued behind the suspend, not failed
        done = subprocess.run([MINIDISK, "halt", "--force", server.url], capture_output=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert server.proc.wait(60) == 0
        out, _ = reader.communicate(timeout=30)
        assert "read 512/512 bytes" not in out  # the queued read did not succeed
        # ...because it was failed, not because the shutdown gave up waiting for it.
        log = server.sock.with_suffix(".log").read_text()
        assert "still busy" not in log, log
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def test_stats_count_what_an_nbd_client_does(serve: Callable[..., Server]) -> None:
    """dmsetup stats end to end: a region, I/O over NBD, libdm's report of the counters
    (which, as libdm's, clears them), and the region's removal."""
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "lin", "--table", "0 2048 linear /dev/a 0")
    assert server.dmsetup("stats", "create", "--areas", "2", "lin").stdout == \
        "lin: Created new region with 2 area(s) as region ID 0\n"
    subprocess.run([SYSTEM_PYTHON, "-c",
                    "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
                    "[h.pread(4096, n * 4096) for n in range(3)]; "
                    "h.pwrite(bytes(8192), 600 * 1024); h.shutdown()",
                    server.uri("/dev/mapper/lin")], check=True, timeout=60)
    fields = "region_id,area_id,area_start,read_count,read_sector_count,write_count," \
             "write_sector_count,reads_merged_count"
    assert server.dmsetup("stats", "report", "--noheadings", "-o", fields, "lin").stdout == \
        "0:0:0:3:24:0:0:2\n0:1:512.00k:0:0:1:16:0\n" \
        "0:0:0b:3:24:1:16:2\n"  # then the region: its area start as libdm's (start+2^49*step)
    assert server.dmsetup("stats", "report", "--noheadings", "-o", "read_count",
                          "lin").stdout == "0\n0\n0\n"  # the report cleared them
    assert server.dmsetup("stats", "list", "-S", "region_id=0", "-o", "name,area_count",
                          "lin").stdout == "Name             #Areas\nlin                   2\n"
    server.dmsetup("stats", "delete", "--regionid", "0", "lin")
    assert server.dmsetup("message", "lin", "0", "@stats_list").stdout == ""
    assert server.dmsetup("measure", "lin").stdout == \
        "0 2048 linear target_name=linear,target_version=1.4.0,device_name=240:0,start=0;\n"
    refused = server.dmsetup("setgeometry", "lin", "70000", "1", "1", "0", check=False)
    assert refused.returncode == 1 and "setgeometry ioctl on lin  failed: Invalid argument" \
        in refused.stderr


def test_table_hides_crypt_keys_unless_showkeys(serve: Callable[..., Server]) -> None:
    """dmsetup prints a crypt key as zeroes of its length; --showkeys prints it."""
    key = "0123456789abcdef" * 4
    server = serve("--memory=/dev/a=1M")
    server.dmsetup("create", "secret", "--table",
                   f"0 8 crypt aes-xts-plain64 {key} 0 /dev/a 0\n")
    server.dmsetup("create", "plain", "--table", "0 8 linear /dev/a 8")
    assert server.dmsetup("table", "secret").stdout == \
        f"0 8 crypt aes-xts-plain64 {'0' * 64} 0 240:0 0\n"
    assert server.dmsetup("table", "--showkeys", "secret").stdout == \
        f"0 8 crypt aes-xts-plain64 {key} 0 240:0 0\n"
    assert server.dmsetup("table").stdout == \
        f"plain: 0 8 linear 240:0 8\nsecret: 0 8 crypt aes-xts-plain64 {'0' * 64} 0 240:0 0\n"
