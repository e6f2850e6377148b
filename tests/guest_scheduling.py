"""How pytest-xdist hands tests to its two workers: each guest module whole, guests first.

A VM test module boots one guest in a module-scoped fixture and its tests read the rows it
left (tests/vm). Spread test by test over two workers, as `--dist load` does, both workers
boot that guest: minutes of TCG time spent twice. `--dist loadgroup` was meant to prevent it,
but with pytest 9.2 it silently groups nothing (pytest-xdist issue #1386: the worker renames
a test's nodeid to carry its group, and pytest no longer keeps the new name), so here the
controller decides by path, which it knows without collecting anything:

- every module under tests/vm/ belongs to one unit, "vm" (one guest at a time on one worker),
  except the autofs guest and the dm-formats guests, units of their own, which run beside it
  on the other worker (the suite's wall time is then the longest chain, not the sum);
- every other test is a unit of its own, as with `--dist load`;
- guest units are handed out first: started last, the longest units would be the suite's
  tail, with the other worker idle.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

GUESTS = "tests/vm/"
OWN_UNITS = {"tests/vm/test_autofs_guest.py": "vm-autofs",  # guests that need not wait
             "tests/vm/test_dm_formats.py": "vm-dm-formats"}
GUEST_UNITS = {"vm", *OWN_UNITS.values()}


class _GuestsFirst(OrderedDict[str, dict[str, bool]]):
    """The scheduler's work queue: popitem(last=False) returns a guest unit while any is left."""

    def popitem(self, last: bool = True) -> tuple[str, dict[str, bool]]:
        if not last:
            for scope in self:
                if scope in GUEST_UNITS:
                    return scope, self.pop(scope)
        return super().popitem(last)


class GuestUnits(LoadScopeScheduling):
    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        self.workqueue = _GuestsFirst()

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        if path.startswith(GUESTS):
            return OWN_UNITS.get(path, "vm")
        return nodeid
