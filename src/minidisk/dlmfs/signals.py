"""Whether the thread behind a FUSE request has a signal to take: dlmfs's EINTR.

OCFS2's dlmfs waits for a lock uninterruptibly (userdlm.c's `user_wait_on_busy_lock` is a
plain `wait_event`) and only looks at `signal_pending()` when it is woken, that is once the
lock is granted to the node: the open then fails with ERESTARTSYS, so no descriptor, and the
node keeps the lock cached with no holder. FUSE gives a daemon no word of the signal (pyfuse3
does not pass INTERRUPT on), but the kernel keeps it pending on the requesting thread until
we answer, and /proc shows it. So when a waited-for lock is granted, `takes_signal` asks
/proc/TID/status and the open answers EINTR if the thread would take a signal on return.

The thread cannot go away, nor its id be reused, while its request is unanswered: FUSE's
`request_wait_answer` ends in an uninterruptible wait, even for SIGKILL. `Requester` still
keeps the thread's start time from when its wait began and checks it again, so a reused id
can never be taken for the thread that asked."""

from __future__ import annotations

import signal
from dataclasses import dataclass

# Signals whose default action is to do nothing (discarded when sent, unless blocked) or to
# stop: dlmfs's ERESTARTSYS is restarted for these, so the open ends granted.
_NOT_FATAL = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH,
                        signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
_FATAL_BY_DEFAULT = sum(1 << (sig - 1) for sig in range(1, 65) if sig not in _NOT_FATAL)


def _start_time(tid: int) -> int | None:
    """Field 22 of /proc/TID/stat: when the thread started, in clock ticks since boot."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything: split after it.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _masks(tid: int) -> dict[bytes, int]:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    masks = {}
    for line in lines:
        key, _, value = line.partition(b":")
        if key in (b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn", b"SigCgt"):
            masks[key] = int(value, 16)
    return masks


def deliverable(masks: dict[bytes, int]) -> int:
    """The pending signals (the thread's own and its process's) that are not blocked and
    that end the wait: caught ones (a handler runs, the call fails with EINTR) and ones whose
    default action kills."""
    pending = (masks.get(b"SigPnd", 0) | masks.get(b"ShdPnd", 0)) & ~masks.get(b"SigBlk", 0)
    caught = masks.get(b"SigCgt", 0)
    fatal = _FATAL_BY_DEFAULT & ~caught & ~masks.get(b"SigIgn", 0)
    return pending & (caught | fatal)


@dataclass(frozen=True)
class Requester:
    """The thread behind one FUSE request (its id is the request's pid), seen when its wait
    began."""

    tid: int
    started: int | None

    @classmethod
    def of(cls, tid: int) -> Requester | None:
        """None when the request came from outside our pid namespace (pid 0)."""
        return cls(tid, _start_time(tid)) if tid > 0 else None

    def takes_signal(self) -> bool:
        if self.started is None or _start_time(self.tid) != self.started:
            return False
        return deliverable(_masks(self.tid)) != 0
