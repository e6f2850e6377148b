"""dlmfs on real FUSE mounts, from os calls and from a plain shell: every row of the dlmfs
table in research/dlm.md §2; a mount is a node (locks cached per mount, given way on demand),
a lock lives as long as its open file description; the optional wait bound and --exclusive.
The `dlmfs` fixture mounts with --wait-limit 2; `nodes` are two default mounts over one lock
manager (tests/vm/test_dlmfs_oracle.py runs the same semantics against the kernel's)."""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests import harness
from tests.dlm.conftest import WORKER, Mount, Server

from minidisk.dlm.client import connect

pytestmark = [pytest.mark.timeout(60)]


def expect_errno(code: int, call, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as err:
        call(*args)
    assert err.value.errno == code, err.value


@contextmanager
def opened(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def status(mount: Mount) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with connect(mount.server.url, name="observer") as client:
            return await client.status()

    return anyio.run(main)


def held_modes(mount: Mount, domain: str, name: str) -> list[str]:
    for dom in status(mount)["domains"]:
        for res in dom["resources"]:
            if dom["name"] == domain and res["name"] == name:
                return sorted(lk["grmode"] for lk in res["granted"])
    return []


class Other:
    """Another process that opens and closes lock files on command (stdin/stdout)."""

    SCRIPT = r"""
import os, socket, sys
fds = {}
parked = []
for line in sys.stdin:
    op, path, flags = line.split()
    try:
        if op == "open":
            fds[path] = os.open(path, int(flags))
            print("ok", flush=True)
        elif op == "park":
            # Send the descriptor into a socket nobody reads, then close it: the description
            # lives on in flight, so FUSE sends FLUSH now but RELEASE never.
            pair = socket.socketpair()
            socket.send_fds(pair[0], [b"x"], [fds[path]])
            parked.append(pair)
            os.close(fds.pop(path))
            print("closed", flush=True)
        else:
            os.close(fds.pop(path))
            print("closed", flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
"""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, op: str, path: Path, flags: int = 0) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{op} {path} {flags}\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def other() -> Iterator[Other]:
    proc = Other()
    yield proc
    proc.stop()


@contextmanager
def mounted(server: Server, mnt: Path, *options: str) -> Iterator[Mount]:
    """`minidisk dlmfs MNT --server URL OPTIONS...` once mounted; unmounted afterwards."""
    mnt.mkdir()
    process = harness.mount_dlmfs(mnt, server.url, *options, log=mnt.parent / f"{mnt.name}.log")
    try:
        yield Mount(mnt, server, process.proc)
    finally:
        harness.unmount_fuse(mnt, process)


@pytest.fixture
def nodes(dlm_server: Server, short_tmp: Path) -> Iterator[tuple[Mount, Mount]]:
    """Two default mounts (nodes A and B) over one lock manager, each with domain "dom"."""
    short_tmp.chmod(0o755)  # other users reach the mounts (the permission tests)
    with mounted(dlm_server, short_tmp / "a") as a, mounted(dlm_server, short_tmp / "b") as b:
        (a.path / "dom").mkdir()
        (b.path / "dom").mkdir()
        yield a, b


@pytest.fixture
def exclusive(dlm_server: Server, short_tmp: Path) -> Iterator[Mount]:
    with mounted(dlm_server, short_tmp / "x", "--exclusive") as mount:
        yield mount


def granted_within(path: Path, flags: int, seconds: float) -> tuple[threading.Thread, list[int]]:
    """A blocking open of `path` in a thread; the list gets its fd once granted."""
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(os.open(path, flags)), daemon=True)
    thread.start()
    thread.join(seconds)
    return thread, got


def trylock(path: Path, flags: int) -> int:
    """0 when a trylock open of `path` is granted (and closed again), else its errno."""
    try:
        os.close(os.open(path, flags | os.O_NONBLOCK))
    except OSError as err:
        return err.errno or -1
    return 0


def test_domains_mkdir_rmdir(dlmfs: Mount) -> None:
    root = dlmfs.path
    os.mkdir(root / ("d" * 63))
    expect_errno(errno.EINVAL, os.mkdir, root / ("d" * 64))
    os.mkdir(root / "dom")
    expect_errno(errno.EEXIST, os.mkdir, root / "dom")
    expect_errno(errno.EPERM, os.mkdir, root / "dom" / "sub")
    assert sorted(os.listdir(root)) == sorted(["d" * 63, "dom"])
    assert "dom" in [d["name"] for d in status(dlmfs)["domains"]]   # joined
    with opened(root / "dom" / "lk", os.O_CREAT | os.O_RDONLY):
        pass
    expect_errno(errno.ENOTEMPTY, os.rmdir, root / "dom")
    os.unlink(root / "dom" / "lk")
    os.rmdir(root / "dom")
    assert "dom" not in [d["name"] for d in status(dlmfs)["domains"]]  # left


def test_lock_file_names_and_creation(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    expect_errno(errno.EINVAL, os.open, dom / ("x" * 32), os.O_CREAT | os.O_RDWR)
    expect_errno(errno.EINVAL, os.open, dom / "$dollar", os.O_CREAT | os.O_RDWR)
    expect_errno(errno.EACCES, os.open, dlmfs.path / "inroot", os.O_CREAT | os.O_RDWR)
    expect_errno(errno.ENOENT, os.open, dom / "never", os.O_RDONLY)
    with opened(dom / ("x" * 31), os.O_CREAT | os.O_RDWR):
        pass
    st = os.stat(dom / ("x" * 31))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 64
    assert os.listdir(dom) == ["x" * 31]


def test_one_mount_is_one_node(nodes: tuple[Mount, Mount], other: Other) -> None:
    """Opens on one mount, from any process, are granted from its one cached lock: PR beside
    PR, PR upconverted to EX beside a PR holder, a process reopening what it holds. (Failed
    before: every open was its own lock, so these gave ETXTBSY or waited.)"""
    a, _ = nodes
    lk = a.path / "dom" / "lk"
    with opened(lk, os.O_CREAT | os.O_RDONLY):
        assert other.ask("open", lk, os.O_RDONLY | os.O_NONBLOCK) == "ok"
        assert held_modes(a, "dom", "lk") == ["PR"]             # one lock for both
        assert other.ask("open", lk, os.O_RDWR | os.O_NONBLOCK) == "ok"   # upconverted
        assert held_modes(a, "dom", "lk") == ["EX"]
        with opened(lk, os.O_WRONLY | os.O_NONBLOCK):
            pass
    assert other.ask("close", lk) == "closed"
    assert held_modes(a, "dom", "lk") == ["EX"]                 # cached after the last close
    # A failed trylock never queued anything.
    assert all(not res["waiting"] for d in status(a)["domains"] for res in d["resources"])


def test_a_cached_lock_is_given_way_on_demand(nodes: tuple[Mount, Mount]) -> None:
    """Another node's trylock fails while the lock is merely cached (no request, no
    notification); its blocking open makes the cache give way: EX falls to PR for a PR
    request, to nothing for EX; the value block travels with it."""
    a, b = nodes
    lk_a, lk_b = a.path / "dom" / "lk", b.path / "dom" / "lk"
    os.close(os.open(lk_b, os.O_CREAT | os.O_RDONLY))
    with opened(lk_a, os.O_CREAT | os.O_RDWR) as fd:
        os.write(fd, b"from A")
    assert trylock(lk_b, os.O_RDONLY) == errno.ETXTBSY
    assert trylock(lk_b, os.O_RDWR) == errno.ETXTBSY
    with opened(lk_b, os.O_RDONLY) as fd:                       # blocking: A gives way
        assert os.read(fd, 64).rstrip(b"\0") == b"from A"
    assert held_modes(a, "dom", "lk") == ["PR", "PR"]           # A kept PR; B caches PR
    assert trylock(lk_a, os.O_RDONLY) == 0
    assert trylock(lk_a, os.O_RDWR) == errno.ETXTBSY
    with opened(lk_a, os.O_RDWR):                               # B falls to nothing
        assert held_modes(a, "dom", "lk") == ["EX"]
    assert trylock(lk_b, os.O_RDONLY) == errno.ETXTBSY


def test_a_lock_lives_as_long_as_its_open_file_description(
        nodes: tuple[Mount, Mount], short_tmp: Path, other: Other) -> None:
    """Held through a symlink to the mount, by a child that outlives its opener, and while
    the description is in flight in a unix socket: the other node's blocking open waits
    until the description's last reference goes. (Failed before: dlmfs compared
    /proc/PID/fd paths at close and dropped these locks under their holders.)"""
    a, b = nodes
    link = short_tmp / "alink"
    link.symlink_to(a.path)
    for name in ("sym", "child", "parked"):
        os.close(os.open(b.path / "dom" / name, os.O_CREAT | os.O_RDONLY))
    child = subprocess.Popen(["bash", "-c", 'exec 9> "$1"; sleep 30 & echo $!', "_",
                              str(a.path / "dom" / "child")], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    sleeper = int(child.stdout.readline())
    child.wait()
    assert other.ask("open", a.path / "dom" / "parked", os.O_CREAT | os.O_RDWR) == "ok"
    assert other.ask("park", a.path / "dom" / "parked") == "closed"
    fd = os.open(link / "dom" / "sym", os.O_CREAT | os.O_RDWR)
    os.dup2(fd, 99)  # `exec 9>` does this: open, dup2, close the original
    os.close(fd)
    waiters = {name: granted_within(b.path / "dom" / name, os.O_RDONLY, 0)
               for name in ("sym", "child", "parked")}
    time.sleep(1.0)
    assert {name: got for name, (_, got) in waiters.items()} == \
        {"sym": [], "child": [], "parked": []}
    os.close(99)
    os.kill(sleeper, signal.SIGKILL)
    for name in ("sym", "child"):
        thread, got = waiters[name]
        thread.join(5)
        assert got, f"{name}: not granted after its last descriptor closed"
        os.close(got[0])
    other.stop()  # the parked description dies with its socket
    thread, got = waiters["parked"]
    thread.join(5)
    assert got
    os.close(got[0])


def test_a_blocking_open_waits_until_granted(nodes: tuple[Mount, Mount]) -> None:
    """No wait limit by default: an open still waiting after 3 s (the old default gave up
    with ETIMEDOUT) is granted when the other node closes."""
    a, b = nodes
    lk = a.path / "dom" / "lk"
    os.close(os.open(b.path / "dom" / "lk", os.O_CREAT | os.O_RDONLY))
    with opened(b.path / "dom" / "lk", os.O_RDWR):
        thread, got = granted_within(lk, os.O_CREAT | os.O_RDONLY, 3.0)
        assert thread.is_alive() and not got
        released = time.monotonic()
    thread.join(10)
    assert got and time.monotonic() - released < 5
    os.close(got[0])


def test_a_waiting_create_stalls_nothing_else_in_the_domain(nodes: tuple[Mount, Mount]) -> None:
    """An O_CREAT open waiting for its lock holds no directory lock: listing, looking up,
    creating and unlinking in the same domain go on. (Failed before: the wait happened in
    FUSE CREATE, under the kernel's lock of the directory.)"""
    a, b = nodes
    os.close(os.open(b.path / "dom" / "busy", os.O_CREAT | os.O_RDONLY))
    os.close(os.open(a.path / "dom" / "old", os.O_CREAT | os.O_RDONLY))
    with opened(b.path / "dom" / "busy", os.O_RDWR):
        thread, got = granted_within(a.path / "dom" / "busy", os.O_CREAT | os.O_RDWR, 0.3)
        assert not got
        done: list[str] = []

        def others() -> None:
            assert sorted(os.listdir(a.path / "dom")) == ["busy", "old"]
            os.close(os.open(a.path / "dom" / "old", os.O_CREAT | os.O_RDONLY))
            os.close(os.open(a.path / "dom" / "new", os.O_CREAT | os.O_RDONLY))
            os.unlink(a.path / "dom" / "new")
            done.append("done")

        worker = threading.Thread(target=others, daemon=True)
        worker.start()
        worker.join(10)
        assert done == ["done"]
    thread.join(5)
    assert got
    os.close(got[0])


def test_the_wait_limit_is_an_option(dlmfs: Mount, dlm_server: Server, short_tmp: Path) -> None:
    """--wait-limit 2: a blocking open gives up with ETIMEDOUT, having queued nothing."""
    with mounted(dlm_server, short_tmp / "b") as b:
        (dlmfs.path / "dom").mkdir()
        (b.path / "dom").mkdir()
        with opened(b.path / "dom" / "lk", os.O_CREAT | os.O_RDWR):
            started = time.monotonic()
            expect_errno(errno.ETIMEDOUT, os.open, dlmfs.path / "dom" / "lk",
                         os.O_CREAT | os.O_RDONLY)
            assert 1.9 < time.monotonic() - started < 4
            assert all(not res["waiting"]
                       for d in status(dlmfs)["domains"] for res in d["resources"])


def test_exclusive_mounts_exclude_local_opens(exclusive: Mount, other: Other) -> None:
    """--exclusive: local opens exclude each other as other nodes' do (our extension)."""
    dom = exclusive.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDONLY):
        assert other.ask("open", lk, os.O_RDONLY | os.O_NONBLOCK) == "ok"   # PR + PR
        assert other.ask("close", lk) == "closed"
        assert other.ask("open", lk, os.O_RDWR | os.O_NONBLOCK) == f"err {errno.ETXTBSY}"
    with opened(lk, os.O_RDWR):
        expect_errno(errno.ETXTBSY, os.open, lk, os.O_RDONLY | os.O_NONBLOCK)
        thread, got = granted_within(lk, os.O_RDONLY, 0.5)
        assert not got
    thread.join(5)    # granted once the description is released (RELEASE is asynchronous)
    assert got
    os.close(got[0])


def test_read_write_value_block(nodes: tuple[Mount, Mount]) -> None:
    """Every write lands at the value block's start: the position only decides ENOSPC and
    how much is taken, and O_APPEND is ignored, as dlmfs clears it at open."""
    lk = nodes[0].path / "dom" / "lk"
    with opened(lk, os.O_CREAT | os.O_RDWR) as fd:
        assert os.pread(fd, 100, 0) == bytes(64)           # never written: 64 zero bytes
        assert os.pwrite(fd, b"y" * 100, 0) == 64          # truncated to the value block
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"z", 64)
        assert os.pwrite(fd, b"ab", 62) == 2               # at offset 0
        assert os.pread(fd, 10, 64) == b""
        assert os.pread(fd, 4, 1) == b"byyy"
    with opened(lk, os.O_WRONLY | os.O_APPEND) as fd:
        assert os.write(fd, b"Z") == 1
    with opened(lk, os.O_RDONLY) as fd:
        assert os.read(fd, 100) == b"Zb" + b"y" * 62
        expect_errno(errno.EBADF, os.write, fd, b"no")     # PR descriptor


def test_byte_and_directory_semantics(nodes: tuple[Mount, Mount]) -> None:
    """fsync EINVAL; mknod S_IFREG makes a lock, other nodes types EPERM; symlink, link and
    rename EPERM; "." and ".." listed; names past 255 bytes ENAMETOOLONG; st_blksize 4096;
    f_namemax 255."""
    dom = nodes[0].path / "dom"
    with opened(dom / "lk", os.O_CREAT | os.O_RDWR) as fd:
        expect_errno(errno.EINVAL, os.fsync, fd)
        expect_errno(errno.EINVAL, os.fdatasync, fd)
    os.mknod(dom / "made", stat.S_IFREG | 0o600)
    assert stat.S_IMODE(os.stat(dom / "made").st_mode) == 0o600
    expect_errno(errno.EPERM, os.mknod, dom / "fifo", stat.S_IFIFO | 0o600)
    expect_errno(errno.EPERM, os.symlink, "x", dom / "sl")
    expect_errno(errno.EPERM, os.link, dom / "lk", dom / "hard")
    expect_errno(errno.EPERM, os.rename, dom / "lk", dom / "lk2")
    expect_errno(errno.ENAMETOOLONG, os.open, dom / ("x" * 256), os.O_CREAT | os.O_RDWR)
    expect_errno(errno.EINVAL, os.open, dom / ("x" * 255), os.O_CREAT | os.O_RDWR)
    listing = subprocess.run(["ls", "-a", str(dom)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [".", "..", "lk", "made"]
    assert os.stat(dom / "lk").st_blksize == 4096
    assert os.statvfs(dom).f_namemax == 255


def test_mode_bits_apply_to_other_users(nodes: tuple[Mount, Mount]) -> None:
    """(Failed before: no allow_other, so every other user got EACCES.)"""
    dom = nodes[0].path / "dom"
    os.close(os.open(dom / "lk", os.O_CREAT | os.O_RDWR, 0o644))
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*nobody, *argv], capture_output=True, text=True, timeout=20)

    assert as_nobody("ls", str(dom)).stdout.split() == ["lk"]
    assert as_nobody("dd", f"if={dom / 'lk'}", "of=/dev/null", "status=none").returncode == 0
    denied = as_nobody("dd", "if=/dev/null", f"of={dom / 'lk'}", "conv=notrunc", "status=none")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    denied = as_nobody("dd", "if=/dev/null", f"of={dom / 'new'}", "status=none")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_read_returns_nothing_when_value_block_invalid(dlmfs: Mount) -> None:
    dom = dlmfs.path / "k"               # the worker's domain and resource: k/held
    dom.mkdir()
    with opened(dom / "held", os.O_CREAT | os.O_RDWR) as fd:
        os.write(fd, b"valid")
    holder = subprocess.Popen([sys.executable, WORKER, "hold", dlmfs.server.url, "EX"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().startswith("held")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with opened(dom / "held", os.O_RDONLY) as fd:
        assert os.read(fd, 64) == b""


def test_poll_reports_a_waiter(nodes: tuple[Mount, Mount]) -> None:
    a, b = nodes
    os.close(os.open(b.path / "dom" / "lk", os.O_CREAT | os.O_RDONLY))
    with opened(a.path / "dom" / "lk", os.O_CREAT | os.O_RDWR) as fd:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(100) == []
        thread, got = granted_within(b.path / "dom" / "lk", os.O_RDONLY, 0)
        events = poller.poll(5000)                        # woken by the other node's wait
        assert events and events[0][1] & select.POLLIN
    thread.join(5)
    assert got
    os.close(got[0])


def test_unlink_busy_while_held(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDONLY):
        expect_errno(errno.EBUSY, os.unlink, lk)
    os.unlink(lk)
    assert os.listdir(dom) == []
    expect_errno(errno.ENOENT, os.open, lk, os.O_RDONLY)
    assert held_modes(dlmfs, "dom", "lk") == []  # unlocked (the resource waits for its purge)


def _resources(mount: Mount, domain: str) -> list[str]:
    return [res["name"] for dom in status(mount)["domains"] if dom["name"] == domain
            for res in dom["resources"]]


def test_an_unlinked_resource_keeps_its_value_block_until_its_purge(
        dlm_server: Server, short_tmp: Path) -> None:
    """As o2dlm keeps an unused resource until its purge: a lock file made again at once finds
    its value block; unmounting purges what is left (none stays in the lock manager). B stays
    in the domain, so that the domain itself, and its resources with it, is not collected."""
    with mounted(dlm_server, short_tmp / "b") as b:
        (b.path / "dom").mkdir()
        with mounted(dlm_server, short_tmp / "a") as a:
            lk = a.path / "dom" / "lk"
            lk.parent.mkdir()
            with opened(lk, os.O_CREAT | os.O_RDWR) as fd:
                os.write(fd, b"kept")
            os.unlink(lk)
            with opened(lk, os.O_CREAT | os.O_RDONLY) as fd:
                assert os.read(fd, 64).rstrip(b"\0") == b"kept"  # (was: nothing)
            os.unlink(lk)
            assert _resources(a, "dom") == ["lk"]  # unlocked, not yet purged
        assert _resources(b, "dom") == []  # purged when A unmounted


def test_chmod_chown_truncate_are_local(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDWR) as fd:
        os.write(fd, b"keep")
        os.ftruncate(fd, 0)
    os.chmod(lk, 0o600)
    os.chown(lk, 1234, 5678)
    st = os.stat(lk)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_size == 64
    with opened(lk, os.O_RDONLY) as fd:
        assert os.read(fd, 4) == b"keep"


def test_lvb_counter_through_dlmfs(exclusive: Mount) -> None:
    """Processes of one machine count through one --exclusive mount (on a default mount
    they would not exclude each other: that is the programs' own business, as on dlmfs)."""
    dom = exclusive.path / "dom"
    dom.mkdir()
    counter = dom / "counter"
    with opened(counter, os.O_CREAT | os.O_RDWR):
        pass
    workers = [subprocess.Popen([sys.executable, WORKER, "fscounter", str(counter), "25"])
               for _ in range(3)]
    for worker in workers:
        assert worker.wait(30) == 0
    with opened(counter, os.O_RDONLY) as fd:
        assert os.read(fd, 64).rstrip(b"\0") == b"75"



def test_counter_across_two_nodes(nodes: tuple[Mount, Mount]) -> None:
    """One counting process per node: the nodes' locks exclude each other, every round
    handing the cached EX over through a blocking notification, value block included."""
    a, b = nodes
    for mount in nodes:
        os.close(os.open(mount.path / "dom" / "counter", os.O_CREAT | os.O_RDONLY))
    workers = [subprocess.Popen([sys.executable, WORKER, "fscounter",
                                 str(mount.path / "dom" / "counter"), "30"])
               for mount in (a, b)]
    for worker in workers:
        assert worker.wait(40) == 0
    with opened(a.path / "dom" / "counter", os.O_RDONLY) as fd:
        assert os.read(fd, 64).rstrip(b"\0") == b"60"

SHELL = r"""
set -eu
cd "$MNT"
mkdir jobs
echo -n 0 > jobs/counter                      # open O_WRONLY|O_CREAT|O_TRUNC: EX; dup2; close
bump() {
    exec 9>jobs/mutex                         # EX on the mutex until fd 9 is closed
    n=$(tr -d '\0' < jobs/counter)            # PR on the counter: read its value block
    printf '%s' $((n + 1)) > jobs/counter     # EX on the counter: write it
    exec 9>&-
}
for i in 1 2 3 4 5; do bump; done
( for i in 1 2 3 4 5; do bump; done ) &
( for i in 1 2 3 4 5; do bump; done ) &
wait
tr -d '\0' < jobs/counter; echo
if ( exec 8<>jobs/counter; exec 7<>jobs/counter ) 2>/dev/null; then echo no-exclusion; fi
exec 6<jobs/counter
if ! ( exec 5<>jobs/counter ) 2>/dev/null; then echo timed-out; fi
exec 6<&-
rm jobs/counter jobs/mutex
rmdir jobs
echo done
"""


def test_from_a_plain_shell(dlm_server: Server, short_tmp: Path) -> None:
    with mounted(dlm_server, short_tmp / "x", "--exclusive", "--wait-limit", "2") as mount:
        out = subprocess.run(["bash", "-c", SHELL], env={**os.environ, "MNT": str(mount.path)},
                             capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["15", "timed-out", "done"], out
