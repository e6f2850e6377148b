"""How many refused link requests a principal may make: a few at once, then exponentially
fewer (issue 10: password guessing must not own the server nor its audit log).

Each principal may be refused FREE times in a row; every further refusal doubles the time
(from BASE up to LONGEST seconds) before its next request is even looked at. Requests made
in that time are answered EAGAIN at once, without a password check or a lock-manager round
trip, and without an audit row of their own: they are counted, and the count goes into the
audit row of the next refusal that is looked at. A success starts the count afresh, and so
does an idle spell of LONGEST seconds.

Refusals that do not count (an authorized user's conflicts: the disk is linked by someone
else) are not slowed down, but the same refusal again within REPEAT seconds gets no audit
row of its own either: it is counted into the next row that is written.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

FREE = 5
BASE = 1.0
LONGEST = 300.0
REPEAT = 10.0
# Principals tracked at most (every uid and subject the server saw refused recently); the
# ones idle longest are forgotten first.
TRACKED = 4096


@dataclass
class _Record:
    refusals: int = 0
    not_before: float = 0.0  # monotonic time of the next request looked at
    last: float = 0.0
    unlooked: int = 0  # requests answered by the limit since the last audited refusal
    repeated: str = ""  # the last uncounted refusal audited, and when
    repeated_at: float = 0.0


class RefusalLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._records: dict[str, _Record] = {}

    def check(self, principal: str) -> None:
        """OSError(EAGAIN) if `principal` must wait before its next request is looked at."""
        record = self._records.get(principal)
        now = self.clock()
        if record is None or now >= record.not_before:
            return
        record.unlooked += 1
        raise OSError(errno.EAGAIN, f"too many refused link requests from {principal}: try "
                      f"again in {record.not_before - now:.1f} s")

    def refused(self, principal: str, counted: bool = True, what: str = "") -> str | None:
        """Note a refusal (`what` says which one); what its audit row should add (the limit
        it starts, the refusals not audited since the last row), or None: no row, for the
        same uncounted refusal again within REPEAT seconds."""
        now = self.clock()
        record = self._records.pop(principal, None) or _Record()
        if now - record.last > LONGEST:
            record.refusals = 0
        self._records[principal] = record  # most recently refused last
        record.last = now
        while len(self._records) > TRACKED:
            del self._records[next(iter(self._records))]
        if not counted:
            if what == record.repeated and now - record.repeated_at < REPEAT:
                record.unlooked += 1
                return None
            record.repeated, record.repeated_at = what, now
        notes = []
        if record.unlooked:
            notes.append(f"{record.unlooked} more refused unaudited before this")
            record.unlooked = 0
        if not counted:
            return "; ".join(notes)
        record.refusals += 1
        if record.refusals >= FREE:
            wait = min(BASE * 2 ** (record.refusals - FREE), LONGEST)
            record.not_before = now + wait
            notes.append(f"rate limit: {record.refusals} refusals in a row, the next "
                         f"{wait:g} s of requests refused unaudited")
        return "; ".join(notes)

    def admitted(self, principal: str) -> None:
        self._records.pop(principal, None)
