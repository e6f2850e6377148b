"""Bounded busy-polling: the budget knob, that a poke spins the loop and then stops, that
spinning never starves other tasks, and that the client and service work with it off."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import anyio
import pytest
from tests.dlm.conftest import serving
from tests.harness import MINIDISK

from minidisk import busypoll
from minidisk.dlm.client import connect
from minidisk.dlm.modes import Mode
from minidisk.dlm.service import DlmService

pytestmark = [pytest.mark.timeout(30)]


@pytest.mark.parametrize(("raw", "seconds"), [
    ("", busypoll.DEFAULT_BUDGET_US / 1e6 if busypoll.several_cpus() else 0.0),
    ("0", 0.0), (" 250 ", 250e-6),
    (str(busypoll.MAX_BUDGET_US), busypoll.MAX_BUDGET_US / 1e6),
])
def test_budget_from_env(raw: str, seconds: float) -> None:
    assert busypoll.budget_from_env({busypoll.ENV: raw}) == pytest.approx(seconds)


def test_no_default_polling_when_pinned_to_one_cpu() -> None:
    """A process that may run on one CPU only does not poll unless told to: its peer would
    need the very CPU it spins on."""
    import subprocess
    import sys

    probe = ("from minidisk import busypoll; "
             "print(busypoll.budget_from_env({}), busypoll.budget_from_env({busypoll.ENV: '80'}))")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", probe],
                            capture_output=True, text=True, check=True)
    assert pinned.stdout.split() == ["0.0", "8e-05"]  # an explicit budget still holds
    if len(os.sched_getaffinity(0)) > 1:
        free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              check=True)
        assert free.stdout.split() == [str(busypoll.DEFAULT_BUDGET_US / 1e6), "8e-05"]


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", str(busypoll.MAX_BUDGET_US + 1)])
def test_budget_from_env_refuses(raw: str) -> None:
    with pytest.raises(ValueError, match=busypoll.ENV):
        busypoll.budget_from_env({busypoll.ENV: raw})


def test_asyncio_poller_spins_for_its_budget_then_sleeps() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        poller = busypoll.AsyncioPoller(loop, 0.02)
        ticks = 0
        original = poller._tick

        def counting_tick() -> None:
            nonlocal ticks
            ticks += 1
            original()

        poller._tick = counting_tick  # type: ignore[method-assign]
        started = time.perf_counter()
        poller.poke()
        assert poller.running
        while poller.running:
            await asyncio.sleep(0)
        spun = time.perf_counter() - started
        assert spun >= 0.02  # its whole budget, on the clock it keeps (no upper bound: load)
        assert ticks > 10  # it kept the loop turning, not one sleep until the deadline
        # Once the budget is spent nothing is queued: the loop sleeps again.
        await asyncio.sleep(0.01)
        assert not poller.running
        assert not loop._ready

    asyncio.run(main())


def test_asyncio_poller_stops_when_nothing_is_wanted_and_when_off() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wanted = True
        poller = busypoll.AsyncioPoller(loop, 10.0, lambda: wanted)
        poller.poke()
        for _ in range(5):
            await asyncio.sleep(0)
        assert poller.running
        wanted = False
        for _ in range(3):
            await asyncio.sleep(0)
        assert not poller.running
        off = busypoll.AsyncioPoller(loop, 0.0)
        off.poke()
        assert not off.running

    asyncio.run(main())


def test_trio_poller_spins_then_sleeps_and_other_tasks_run() -> None:
    trio = pytest.importorskip("trio")

    async def main() -> None:
        poller = busypoll.TrioPoller(trio, 0.02)
        others = 0

        async def other() -> None:
            nonlocal others
            while True:
                others += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await trio.sleep(0.01)
            assert poller.sleeper is not None  # nothing to spin for: asleep
            nursery.start_soon(other)
            poller.poke()
            await trio.sleep(0)
            assert poller.sleeper is None  # woken
            await trio.sleep(0.05)
            assert poller.sleeper is not None  # budget spent: asleep again
            assert others > 10  # the spinning never kept the other task from running
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the in-process service is asyncio's
@pytest.mark.parametrize("budget_us", ["0", "100"])
async def test_lock_cycles_with_busy_poll_on_and_off(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     budget_us: str) -> None:
    """The same lock, LVB and handoff behaviour whether either side polls; and a task on the
    client's loop keeps running while the client spins for replies."""
    monkeypatch.setenv(busypoll.ENV, budget_us)
    service = DlmService()
    path = str(tmp_path / "dlm.sock")
    await service.start(path)
    assert service.busy_poll == int(budget_us) / 1e6
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    try:
        async with connect(f"unix://{path}", name="a") as a, \
                connect(f"unix://{path}", name="b") as b, anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            lock = a.lock("d", "counter", Mode.EX)
            for n in range(200):
                assert await lock.acquire()
                value = int.from_bytes(lock.lvb[:8], "little")
                assert value == n
                lock.write_lvb((n + 1).to_bytes(8, "little"))
                await lock.release()
            other = b.lock("d", "counter", Mode.PR)
            assert await other.acquire()
            assert int.from_bytes(other.lvb[:8], "little") == 200
            await other.release()
            tg.cancel_scope.cancel()
        assert ticks > 200
    finally:
        await service.close()


def test_dlm_serve_takes_the_budget_and_refuses_a_bad_one(short_tmp: Path) -> None:
    import subprocess

    env = {**os.environ, busypoll.ENV: "ten"}
    bad = subprocess.run([MINIDISK, "dlm", "serve", f"unix://{short_tmp}/a.sock"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 1  # click's ClickException, not a usage error (2)
    assert f"{busypoll.ENV}='ten': expected microseconds" in bad.stderr
    assert not (short_tmp / "a.sock").exists()
    # The flag wins over the environment, and 0 serves without polling.
    with serving(str(short_tmp / "b.sock"), "--busy-poll-us", "0", env=env) as server:

        async def cycle() -> None:
            async with connect(server.url) as client:
                lock = client.lock("d", "r", Mode.EX)
                assert await lock.acquire()
                await lock.release(wait=True)

        anyio.run(cycle)
    refused = subprocess.run([MINIDISK, "dlm", "serve", "--busy-poll-us", "20000",
                              f"unix://{short_tmp}/c.sock"], capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode == 2 and "--busy-poll-us" in refused.stderr
