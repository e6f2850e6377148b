"""Is an open file description still referenced after one of its descriptors was closed?

FUSE sends FLUSH on every close(2) of a descriptor and RELEASE (asynchronously) only when the
last reference to the open file description goes. dlmfs must drop a lock before close(2)
returns, so it drops in FLUSH -- but a shell redirection opens the file, dup2()s it onto 1 and
closes the original, and a fork() duplicates descriptors: dropping at *every* FLUSH would drop
the lock under a process that still uses it.

pyfuse3 does not pass the closing process or FUSE's lock_owner to FLUSH, and kcmp(2) (which
could say whether two descriptors share a description) is not available everywhere, so this
counts instead: the descriptors naming the lock file in the processes that opened its live
handles and in their descendants (where fork()ed copies go). When there are at least as many
as there are live handles, every handle may still be referenced and the lock is kept; RELEASE
then drops it (a little later, never earlier). A description handed to an unrelated process
(SCM_RIGHTS) or kept by a child that outlives its opener is not seen: its lock is dropped at
its opener's last close.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def family(pids: Iterable[int]) -> set[int]:
    """`pids` and all their living descendants."""
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone
        found.add(pid)
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return found


def descriptors_naming(path: str, pids: Iterable[int]) -> int:
    """How many descriptors of these processes name `path`."""
    count = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    count += 1
            except OSError:
                continue
    return count
