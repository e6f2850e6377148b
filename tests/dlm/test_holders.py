"""`minidisk.dlmfs.holders`, the /proc scan behind dlmfs's close: process trees (threads
included) and descriptors naming a file, counted up to the limit that decides."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from minidisk.dlmfs import holders

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_family_follows_children_of_every_thread_and_grandchildren(tmp_path: Path) -> None:
    direct = subprocess.Popen(SLEEPER)
    # A shell whose own child is the grandchild; and a child forked by another thread.
    shell = subprocess.Popen(["bash", "-c", f"{sys.executable} -c 'import time; "
                              "time.sleep(60)' & echo $!; wait"], stdout=subprocess.PIPE,
                             text=True)
    from_thread: list[subprocess.Popen[bytes]] = []
    spawner = threading.Thread(target=lambda: from_thread.append(subprocess.Popen(SLEEPER)))
    spawner.start()
    spawner.join()
    try:
        assert shell.stdout is not None
        grandchild = int(shell.stdout.readline())
        found = holders.family([os.getpid()])
        assert {os.getpid(), direct.pid, shell.pid, grandchild, from_thread[0].pid} <= found
        assert holders.children(direct.pid) == []
    finally:
        for proc in (direct, shell, *from_thread):
            proc.kill()
            proc.wait()
    os.kill(grandchild, 9)
    assert holders.children(direct.pid) is None           # gone
    assert holders.family([direct.pid]) == set()


def test_descriptors_naming_counts_dups_and_inherited_copies(tmp_path: Path) -> None:
    path = str(tmp_path / "lk")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    dup = os.dup(fd)
    try:
        me = [os.getpid()]
        assert holders.descriptors_naming(path, me) == 2
        assert holders.descriptors_naming(path, me, enough=1) == 1   # stops at the limit
        assert holders.still_referenced(path, me, live=1)              # 2 > 1
        assert not holders.still_referenced(path, me, live=2)
        os.close(dup)
        assert not holders.still_referenced(path, me, live=1)
        # A fork()ed copy in a child counts (through the family), an unrelated file not.
        child = subprocess.Popen(SLEEPER, pass_fds=[fd])
        try:
            os.close(fd)
            fd = -1
            assert holders.still_referenced(path, me, live=0)
            assert holders.descriptors_naming(str(tmp_path / "other"), [child.pid]) == 0
        finally:
            child.kill()
            child.wait()
        assert not holders.still_referenced(path, me, live=0)
    finally:
        if fd >= 0:
            os.close(fd)
