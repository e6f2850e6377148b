"""dlmfs on a real FUSE mount, from os calls and from a plain shell: every row of the dlmfs
table in research/dlm.md §2, the wait bound, and close dropping the lock before it returns."""

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

from minidisk.dlm.client import connect

from .conftest import WORKER, Mount  # type: ignore[import-not-found]

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


def test_open_modes_and_trylock(dlmfs: Mount, other: Other) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDONLY):
        assert held_modes(dlmfs, "dom", "lk") == ["PR"]
        assert other.ask("open", lk, os.O_RDONLY | os.O_NONBLOCK) == "ok"   # PR + PR
        assert held_modes(dlmfs, "dom", "lk") == ["PR", "PR"]
        assert other.ask("close", lk) == "closed"
        assert other.ask("open", lk, os.O_RDWR | os.O_NONBLOCK) == f"err {errno.ETXTBSY}"
        assert other.ask("open", lk, os.O_WRONLY | os.O_NONBLOCK) == f"err {errno.ETXTBSY}"
    for flags in (os.O_RDWR, os.O_WRONLY):
        with opened(lk, flags):
            assert held_modes(dlmfs, "dom", "lk") == ["EX"]
            # The deliberate divergence: the same machine, even the same process, excluded.
            expect_errno(errno.ETXTBSY, os.open, lk, os.O_RDONLY | os.O_NONBLOCK)
            assert other.ask("open", lk, os.O_RDONLY | os.O_NONBLOCK) == f"err {errno.ETXTBSY}"
    assert held_modes(dlmfs, "dom", "lk") == []
    # A failed trylock never queued anything.
    assert all(not res["waiting"] for d in status(dlmfs)["domains"] for res in d["resources"])


def test_blocking_open_is_granted_on_close_and_bounded_by_wait_limit(dlmfs: Mount,
                                                                      other: Other) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    assert other.ask("open", lk, os.O_CREAT | os.O_RDWR) == "ok"
    started = time.monotonic()
    expect_errno(errno.ETIMEDOUT, os.open, lk, os.O_RDONLY)    # --wait-limit 2
    assert 1.9 < time.monotonic() - started < 4
    assert all(not res["waiting"] for d in status(dlmfs)["domains"] for res in d["resources"])
    result: list[float] = []

    def wait_for_it() -> None:
        with opened(lk, os.O_RDONLY):
            result.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.5)
    released = time.monotonic()
    assert other.ask("close", lk) == "closed"
    waiter.join(5)
    assert result and result[0] - released < 1.0


def test_read_write_value_block(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDWR) as fd:
        assert os.pread(fd, 100, 0) == bytes(64)           # never written: 64 zero bytes
        assert os.pwrite(fd, b"y" * 100, 0) == 64          # truncated to the value block
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"z", 64)
        assert os.pwrite(fd, b"ab", 62) == 2
        assert os.pread(fd, 10, 64) == b""
    with opened(lk, os.O_RDONLY) as fd:
        assert os.read(fd, 100) == b"y" * 62 + b"ab"
        expect_errno(errno.EBADF, os.write, fd, b"no")     # PR descriptor


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


def test_poll_reports_a_waiter(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDWR) as fd:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(100) == []
        waiter = threading.Thread(target=lambda: expect_errno(errno.ETIMEDOUT, os.open, lk,
                                                              os.O_RDONLY))
        waiter.start()
        events = poller.poll(1500)                        # woken by the bast
        assert events and events[0][1] & select.POLLIN
        waiter.join()


def test_close_drops_the_lock_before_returning(dlmfs: Mount, other: Other) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    for close in ("close", "park") * 15:
        assert other.ask("open", lk, os.O_CREAT | os.O_RDWR) == "ok"
        assert other.ask(close, lk) == "closed"
        # Right after close(2) returned; with "park" no RELEASE ever comes, so only a drop
        # in FLUSH lets this through.
        fd = os.open(lk, os.O_RDWR | os.O_NONBLOCK)
        os.close(fd)
        assert other.ask("open", lk, os.O_RDWR | os.O_NONBLOCK) == "ok"
        assert other.ask("close", lk) == "closed"


def test_unlink_busy_while_held(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
    dom.mkdir()
    lk = dom / "lk"
    with opened(lk, os.O_CREAT | os.O_RDONLY):
        expect_errno(errno.EBUSY, os.unlink, lk)
    os.unlink(lk)
    assert os.listdir(dom) == []
    expect_errno(errno.ENOENT, os.open, lk, os.O_RDONLY)
    assert all(not d["resources"] for d in status(dlmfs)["domains"])  # dropped


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


def test_lvb_counter_through_dlmfs(dlmfs: Mount) -> None:
    dom = dlmfs.path / "dom"
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


def test_from_a_plain_shell(dlmfs: Mount) -> None:
    out = subprocess.run(["bash", "-c", SHELL], env={**os.environ, "MNT": str(dlmfs.path)},
                         capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["15", "timed-out", "done"], out
