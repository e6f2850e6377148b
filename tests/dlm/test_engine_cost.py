"""What one request costs the engine when a resource has many compatible holders: the work is
counted (lines of engine.py executed, traced), not timed, and must be the same for 8 holders
as for 512 -- a grant, a conversion or an unlock looks at mode counts and at the lock it
changes, not at every holder."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from minidisk.dlm import engine as engine_module
from minidisk.dlm.engine import Engine
from minidisk.dlm.modes import Mode
from minidisk.dlm.state import Blocking, Event, Granted

ENGINE = engine_module.__file__


def work(step: Callable[[], object]) -> int:
    """How many lines of engine.py `step` executes."""
    lines = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if frame.f_code.co_filename != ENGINE:
            return None
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    return lines


def readers(count: int) -> tuple[Engine, list[int]]:
    """An engine whose resource d/r has `count` PR holders, each its own owner."""
    e = Engine()
    ids = [e.request(f"reader{i}", "d", "r", Mode.PR)[0] for i in range(count)]
    return e, ids


def with_queue(count: int) -> tuple[Engine, list[int], int, int]:
    """`readers(count)`, then an EX request queued behind them (all told of it) and a PR one
    queued behind that (which no compatible newcomer may overtake)."""
    e, ids = readers(count)
    writer, events = e.request("writer", "d", "r", Mode.EX)
    assert len(events) == count and all(isinstance(ev, Blocking) for ev in events)
    late, events = e.request("late", "d", "r", Mode.PR)
    assert events == []
    return e, ids, writer, late


def _costs(scenario: Callable[[int], Iterator[tuple[str, Callable[[], object]]]]
           ) -> dict[str, list[int]]:
    costs: dict[str, list[int]] = {}
    for count in (8, 512):
        for name, step in scenario(count):
            costs.setdefault(name, []).append(work(step))
    return costs


def _no_waiters(count: int) -> Iterator[tuple[str, Callable[[], object]]]:
    e, ids = readers(count)
    yield "grant", lambda: e.request("newcomer", "d", "r", Mode.PR)
    yield "down-convert", lambda: e.convert(ids[0], Mode.CR)
    yield "up-convert", lambda: e.convert(ids[0], Mode.PR)
    yield "unlock", lambda: e.unlock(ids[1])


def _waiters(count: int) -> Iterator[tuple[str, Callable[[], object]]]:
    e, ids, writer, late = with_queue(count)
    yield "queued behind", lambda: e.request("later", "d", "r", Mode.PR)
    yield "down-convert", lambda: e.convert(ids[0], Mode.NL)
    yield "unlock", lambda: e.unlock(ids[1])
    yield "cancel", lambda: e.cancel(late)


@pytest.mark.parametrize("scenario", [_no_waiters, _waiters], ids=["no-waiters", "waiters"])
def test_a_request_costs_the_same_whatever_the_number_of_compatible_holders(
        scenario: Callable[[int], Iterator[tuple[str, Callable[[], object]]]]) -> None:
    costs = _costs(scenario)
    assert all(few == many for few, many in costs.values()), costs


def test_the_cheap_paths_still_grant_and_notify() -> None:
    """The same steps as above, for what they do: the counted paths are the real ones."""
    e, ids, writer, late = with_queue(8)
    # Granted in place; CR still blocks the waiting EX, and a grant starts a new round of
    # basts: the fresh holder alone is told again.
    events: list[Event] = e.convert(ids[0], Mode.CR)
    assert [type(ev) for ev in events] == [Granted, Blocking]
    assert events[1] == Blocking(ids[0], "reader0", Mode.EX)
    for lkid in ids:
        events = e.unlock(lkid)
    # The writer at last, at once told of the PR request queued behind it.
    assert [(type(ev), ev.lkid) for ev in events] == [(Granted, writer), (Blocking, writer)]
    assert e.unlock(writer) == [Granted(late, "late", Mode.PR, e.state(late).token,
                                        bytes(64), 0, True, False)]
