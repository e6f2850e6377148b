"""Many real processes against one service: the history checker, the value-block counter,
kill -9 of a holder, orphans, and the `minidisk dlm status|purge` commands."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from tests.dlm.conftest import WORKER, Server, dlm_cli

from minidisk.dlm.client import connect
from minidisk.dlm.modes import Mode, compatible

pytestmark = pytest.mark.timeout(90)

Interval = tuple[str, str, float, float]


def overlapping_incompatible(history: list[Interval]) -> list[tuple[Interval, Interval]]:
    """Every pair of intervals on one resource, in incompatible modes, that overlap."""
    bad = []
    for x, y in itertools.combinations(history, 2):
        if x[0] != y[0] or compatible(Mode[x[1]], Mode[y[1]]):
            continue
        if x[2] < y[3] and y[2] < x[3]:
            bad.append((x, y))
    return bad


def test_checker_catches_an_overlap() -> None:
    ok = [("r", "EX", 0.0, 1.0), ("r", "PR", 1.5, 2.0), ("r", "PR", 1.6, 2.5),
          ("s", "EX", 0.5, 1.2)]
    assert overlapping_incompatible(ok) == []
    bad = [*ok, ("r", "CW", 1.9, 3.0)]
    assert len(overlapping_incompatible(bad)) == 2


def test_history_never_overlaps_incompatible_grants(dlm_server: Server,
                                                   short_tmp: Path) -> None:
    workers = [
        subprocess.Popen([sys.executable, WORKER, "history", dlm_server.url,
                          str(short_tmp / f"h{i}.json"), str(i), "60"])
        for i in range(6)
    ]
    for worker in workers:
        assert worker.wait(60) == 0
    history: list[Interval] = []
    for i in range(6):
        history += [(str(name), str(mode), float(start), float(end)) for name, mode, start, end
                    in json.loads((short_tmp / f"h{i}.json").read_text())]
    assert len(history) == 360
    # The workers really contended: some incompatible pairs ran back to back.
    assert sum(1 for x, y in itertools.combinations(history, 2)
               if x[0] == y[0] and not compatible(Mode[x[1]], Mode[y[1]])) > 1000
    assert overlapping_incompatible(history) == []


def test_lvb_counter_loses_no_update(dlm_server: Server) -> None:
    async def main() -> None:
        async with connect(dlm_server.url, name="parent") as parent:
            await parent.join("c")  # a member keeps the domain (and its value blocks) alive
            workers = [subprocess.Popen([sys.executable, WORKER, "counter", dlm_server.url,
                                         "50"]) for _ in range(4)]
            for worker in workers:
                while worker.poll() is None:
                    await anyio.sleep(0.05)
                assert worker.returncode == 0
            lock = parent.lock("c", "counter", Mode.PR)
            assert await lock.acquire()
            assert lock.lvb.rstrip(b"\0") == b"200" and lock.lvb_seq == 200

    anyio.run(main)


def start_holder(server: Server, mode: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    holder = subprocess.Popen([sys.executable, WORKER, "hold", server.url, mode, *extra],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    line = holder.stdout.readline().split()
    assert line[0] == "held", line
    return holder, int(line[1])


async def wait_until_orphaned(url: str) -> None:
    """Until the lock manager has seen its holder die: a granted lock has become an orphan."""
    async with connect(url, name="observer") as client:
        while True:
            status = await client.status()
            if any(lock.get("orphan_of") for dom in status["domains"]
                   for res in dom["resources"] for lock in res["granted"]):
                return
            await anyio.sleep(0.01)


async def wait_until_queued(url: str, count: int) -> None:
    async with connect(url, name="observer") as client:
        while True:
            status = await client.status()
            queued = sum(len(res["waiting"]) for dom in status["domains"]
                         for res in dom["resources"])
            if queued >= count:
                return
            await anyio.sleep(0.01)


def test_kill_9_ex_holder_hands_over_with_lvb_invalid(dlm_server: Server) -> None:
    holder, holder_token = start_holder(dlm_server, "EX")

    async def main() -> None:
        async with connect(dlm_server.url, name="waiter") as client:
            lock = client.lock("k", "held", Mode.PR)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(lock.acquire)
                await wait_until_queued(dlm_server.url, 1)
                holder.send_signal(signal.SIGKILL)
                while not lock.held:  # granted once the server sees the connection drop
                    await anyio.sleep(0.001)
            assert not lock.lvb_valid
            assert lock.token is not None and lock.token > holder_token

    try:
        anyio.run(main)
    finally:
        holder.kill()
        holder.wait()


def test_persistent_lock_orphaned_then_purged_from_the_cli(dlm_server: Server) -> None:
    holder, _ = start_holder(dlm_server, "EX", "persistent")

    async def main() -> None:
        async with connect(dlm_server.url, name="waiter") as client:
            lock = client.lock("k", "held", Mode.EX)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(lock.acquire)
                await wait_until_queued(dlm_server.url, 1)
                holder.kill()
                holder.wait()
                await wait_until_orphaned(dlm_server.url)
                assert not lock.held                      # the orphan still holds EX
                status = json.loads(await anyio.to_thread.run_sync(dlm_cli, dlm_server,
                                                                     "status", "--json"))
                (res,) = status["domains"][0]["resources"]
                (orphan,) = res["granted"]
                assert orphan["owner"] is None and orphan["orphan_of"].startswith("holder[")
                assert orphan["grmode"] == "EX" and orphan["persistent"]
                text = await anyio.to_thread.run_sync(dlm_cli, dlm_server, "status")
                assert "ORPHAN of holder[" in text and "waiting    EX" in text
                out = await anyio.to_thread.run_sync(
                    dlm_cli, dlm_server, "purge", "--pid", str(holder.pid))
                assert out.strip() == "purged 1 orphan lock"
                with anyio.fail_after(2):
                    while not lock.held:
                        await anyio.sleep(0.01)
            assert not lock.lvb_valid

    anyio.run(main)
