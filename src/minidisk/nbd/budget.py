"""The server-wide budget of payload bytes in memory: READ reply buffers and WRITE payloads.

A connection takes a request's payload size from its own budget and from this one before
it allocates the buffer, and gives it back once the bytes are gone (a WRITE the device
completed, a READ reply the transport took while under its high-water mark). A request
that does not fit is not failed: its connection stops parsing and reading (back-pressure)
and queues here, first come first served, so that a large request is not starved by a
stream of small ones. A request larger than the whole budget fits when nothing else is
in flight: it is served alone rather than never.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from minidisk.nbd import protocol as p


class Waiter(Protocol):
    def budget_freed(self) -> None:
        """Called (from the event loop) when the waiter is first in line and bytes came
        back: try to take again."""


def payload_charge(cmd: int, length: int) -> int:
    """Payload budget bytes a request holds: its READ reply or WRITE payload, or room for
    the largest BLOCK_STATUS reply it may get."""
    if cmd in (p.CMD_READ, p.CMD_WRITE):
        return length
    if cmd == p.CMD_BLOCK_STATUS:
        return p.U32.size + p.BLOCK_STATUS_DESCRIPTOR.size * p.max_descriptors(length)
    return 0


def fits(used: int, size: int, limit: int) -> bool:
    """Whether `size` more bytes may be taken: within the limit, or alone."""
    return used == 0 or used + size <= limit


class PayloadBudget:
    def __init__(self, limit: int, on_idle: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0  # the most in use since the budget was last idle
        self.queue: deque[Waiter] = deque()
        self.on_idle = on_idle  # called with the peak when the last byte comes back

    def take(self, size: int, waiter: Waiter) -> bool:
        """Take `size` bytes for `waiter`, or queue it (once) and return False."""
        first = bool(self.queue) and self.queue[0] is waiter
        if (self.queue and not first) or not fits(self.used, size, self.limit):
            if not first and waiter not in self.queue:
                self.queue.append(waiter)
            return False
        if first:
            self.queue.popleft()
        self.used += size
        self.peak = max(self.peak, self.used)
        if self.queue:  # the next in line may fit as well
            self.queue[0].budget_freed()
        return True

    def give(self, size: int) -> None:
        self.used -= size
        if self.queue:
            self.queue[0].budget_freed()
        elif self.used == 0 and self.on_idle is not None:
            peak, self.peak = self.peak, 0
            self.on_idle(peak)

    def leave(self, waiter: Waiter) -> None:
        """`waiter` is gone (its connection closed): the next one may go ahead."""
        if waiter in self.queue:
            self.queue.remove(waiter)
            if self.queue:
                self.queue[0].budget_freed()
