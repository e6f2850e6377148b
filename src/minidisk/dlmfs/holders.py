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

This runs in every FLUSH, synchronously in the FUSE daemon, so it is written for speed: raw
`os` calls (no file objects), a thread count from the `st_nlink` of /proc/PID/task (threads +
2) so that a single-threaded process costs one read of its `children` file, descriptors read
relative to an open /proc/PID/fd (no path walk per link), and the count stops as soon as it
reaches the limit that decides. It never stat()s a descriptor: that could send a request to
this very FUSE daemon, which is busy running it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _children_of_task(pid: int, tid: int | str) -> list[int]:
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    return [int(child) for child in b"".join(chunks).split()]


def children(pid: int) -> list[int] | None:
    """The living children of `pid` (of all its threads); None when it is gone."""
    try:
        threads = os.stat(f"/proc/{pid}/task").st_nlink - 2
    except OSError:
        return None
    if threads == 1:
        return _children_of_task(pid, pid)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found: list[int] = []
    for tid in tasks:
        found.extend(_children_of_task(pid, tid))
    return found


def family(pids: Iterable[int]) -> set[int]:
    """`pids` and all their living descendants."""
    found: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        kids = children(pid)
        if kids is None:
            continue  # gone
        found.add(pid)
        todo.extend(kids)
    return found


def descriptors_naming(path: str, pids: Iterable[int], enough: int | None = None) -> int:
    """How many descriptors of these processes name `path` -- or, with `enough`, at least
    that many once that many are found (the caller only compares with it)."""
    count = 0
    readlink = os.readlink
    for pid in pids:
        try:
            dirfd = os.open(f"/proc/{pid}/fd", _DIR_FLAGS)
        except OSError:
            continue
        try:
            fds = os.listdir(dirfd)
            for fd in fds:
                try:
                    if readlink(fd, dir_fd=dirfd) == path:
                        count += 1
                except OSError:
                    continue
                if enough is not None and count >= enough:
                    return count
        except OSError:
            continue
        finally:
            os.close(dirfd)
    return count


def still_referenced(path: str, openers: Iterable[int], live: int) -> bool:
    """Whether the descriptors naming `path` in the openers' process trees could still hold
    `live` + 1 handles (the one being flushed and `live` others), so the flushed one may not
    be its description's last descriptor."""
    return descriptors_naming(path, family(openers), enough=live + 1) > live
