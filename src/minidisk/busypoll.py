"""Bounded busy-polling: keep an event loop awake for a few tens of microseconds after I/O.

A request/reply exchange between two processes costs two wake-ups: the server's when the
request arrives, the client's when the reply does. When the waiting side has gone idle, each
wake-up is an inter-processor interrupt to a halted CPU; under a hypervisor that is a VM exit
and a host reschedule, 15-30 microseconds apiece on the machines we measured -- more than the
Python work of a lock cycle, and half of a 4 KiB NBD read at queue depth 1. A CPU that is
still running when the data arrives picks it up in about a microsecond.

So, like the kernel's busy_poll sockets and cpuidle's haltpoll governor, whoever expects a
message soon keeps its loop spinning -- polling its descriptors with a zero timeout, and
yielding the CPU between passes to any other runnable process -- for a bounded time before it
lets the CPU sleep. Spinning goes through the event loop itself, so every descriptor and task
on the loop is still served in turn; nothing is read out of order.

Users: the lock manager's client (while a reply is due) and service (after each request),
budget $MINIDISK_DLM_BUSY_POLL_US, default `DEFAULT_BUDGET_US`, 0 = off; and the NBD server
(after each request and reply), `minidisk serve --busy-poll-us`, off by default. The cost is
CPU: at most one budget of spinning per message when nothing comes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from os import sched_yield
from time import perf_counter
from typing import Any

ENV = "MINIDISK_DLM_BUSY_POLL_US"
# Long enough to cover the other side's Python work for one message (service: handle a
# request and reply, ~20-40 us; client: take the reply and send the next request), short
# enough that an idle connection costs nothing noticeable.
DEFAULT_BUDGET_US = 100
MAX_BUDGET_US = 10_000


def several_cpus() -> bool:
    """May this process run on more than one CPU? Polling pays only when the message comes
    from a process running on another CPU. Pinned to one (taskset, a one-CPU container), the
    poller would spin away the time its peer needs to send that message: measured with
    everything on one vCPU, lock+unlock fell from 28,000/s to 19,700/s with polling on."""
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return (os.cpu_count() or 1) > 1


def budget_from_env(environ: dict[str, str] | None = None) -> float:
    """The configured budget in seconds; 0 means off. Unset: the default, unless this
    process may run on one CPU only (`several_cpus`). A bad value is an error, not
    silently the default: a mistyped tuning knob should not go unnoticed."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_US / 1e6 if several_cpus() else 0.0
    try:
        micros = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected microseconds, an integer") from None
    if not 0 <= micros <= MAX_BUDGET_US:
        raise ValueError(f"{ENV}={raw!r}: expected 0 to {MAX_BUDGET_US} microseconds")
    return micros / 1e6


class AsyncioPoller:
    """Keeps an asyncio loop spinning until a deadline: while a callback is queued, the
    loop polls its selector with a zero timeout instead of sleeping in it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: float,
                 wanted: Callable[[], bool] | None = None) -> None:
        self.loop = loop
        self.budget = budget
        self.wanted = wanted  # spin only while this says there is something to wait for
        self.deadline = 0.0
        self.running = False

    def poke(self) -> None:
        """Spin for (another) `budget` from now."""
        if self.budget <= 0:
            return
        self.deadline = perf_counter() + self.budget
        if not self.running:
            self.running = True
            self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        wanted = self.wanted
        if perf_counter() < self.deadline and (wanted is None or wanted()):
            sched_yield()
            self.loop.call_soon(self._tick)
        else:
            self.running = False


class TrioPoller:
    """The same for trio: a task that keeps yielding while spinning (trio polls with a zero
    timeout whenever a task is runnable) and sleeps otherwise."""

    def __init__(self, trio: Any, budget: float, wanted: Callable[[], bool] | None = None
                 ) -> None:
        self.trio = trio
        self.budget = budget
        self.wanted = wanted
        self.deadline = 0.0
        self.sleeper: Any = None  # the spinning task while it sleeps

    def poke(self) -> None:
        if self.budget <= 0:
            return
        self.deadline = perf_counter() + self.budget
        sleeper, self.sleeper = self.sleeper, None
        if sleeper is not None:
            self.trio.lowlevel.reschedule(sleeper)

    async def run(self) -> None:
        """The spinning task: run it in the connection's task group."""
        lowlevel = self.trio.lowlevel

        def abort(_: Any) -> Any:
            self.sleeper = None
            return lowlevel.Abort.SUCCEEDED

        checkpoint = lowlevel.cancel_shielded_checkpoint
        while True:
            wanted = self.wanted
            if perf_counter() < self.deadline and (wanted is None or wanted()):
                sched_yield()
                await checkpoint()
                continue
            self.sleeper = lowlevel.current_task()
            await lowlevel.wait_task_rescheduled(abort)
