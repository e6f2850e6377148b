"""The lock manager's figures: grants at once, requests that waited, and how long they waited
(a log2 histogram of ~µs, as nbd/stats.py keeps for requests), for `serve --metrics`.

Only a request that queues is timed (one clock read when it queues, one when its grant is
delivered), so an uncontended lock costs a counter increment; the wait is from the request's
arrival to its grant being queued to the client: the handoff as the lock manager sees it.
"""

from __future__ import annotations

from time import monotonic_ns
from typing import Any

from minidisk.histogram import BUCKETS, as_json, bucket_of


class DlmFigures:
    __slots__ = ("granted_at_once", "waited", "granted_after_wait", "refused",
                 "wait_latency", "wait_ns", "_queued_at")

    def __init__(self) -> None:
        self.granted_at_once = 0
        self.waited = 0  # requests that queued (granted later, cancelled or dropped)
        self.granted_after_wait = 0
        self.refused = 0  # requests answered with an error (NOQUEUE, limits, deadlocks)
        self.wait_latency = [0] * BUCKETS
        self.wait_ns = 0
        self._queued_at: dict[int, int] = {}  # lock id → when it queued

    def queued(self, lkid: int) -> None:
        self.waited += 1
        self._queued_at[lkid] = monotonic_ns()

    def granted(self, lkid: int) -> None:
        """A Granted event for `lkid` is delivered: the end of its wait, if it waited."""
        since = self._queued_at.pop(lkid, None)
        if since is not None:
            took = monotonic_ns() - since
            self.granted_after_wait += 1
            self.wait_latency[bucket_of(took)] += 1
            self.wait_ns += took

    def forget(self, lkid: int) -> None:
        """The lock is gone (unlocked, cancelled, its owner gone) before any grant."""
        self._queued_at.pop(lkid, None)

    def waiting(self) -> int:
        return len(self._queued_at)

    def to_json(self) -> dict[str, Any]:
        return {"granted_at_once": self.granted_at_once, "waited": self.waited,
                "granted_after_wait": self.granted_after_wait, "refused": self.refused,
                "waiting": self.waiting(),
                "wait_us": as_json(self.wait_latency),
                "wait_sum_us": round(self.wait_ns / 1000, 3)}
