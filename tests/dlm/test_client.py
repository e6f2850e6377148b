"""The client API against a real service process, on asyncio and on trio."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import anyio
import pytest
from tests.dlm.conftest import Server

from minidisk.dlm.client import connect
from minidisk.dlm.engine import DlmError
from minidisk.dlm.modes import Mode
from minidisk.dlm.o2dlm import BusyLock, LvbInvalid, RecursiveLock, TrylockFailed
from minidisk.dlm.service import start_dlm_service
from minidisk.dlm.state import Flag

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def waiting_on(url: str, name: str) -> list[str]:
    async with connect(url, name="observer") as client:
        for domain in (await client.status())["domains"]:
            for res in domain["resources"]:
                if res["name"] == name:
                    return [lk["owner"] for lk in res["converting"] + res["waiting"]]
    return []


async def test_acquire_release_token_and_lvb(dlm_server: Server) -> None:
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b:
        first = a.lock("d", "r", Mode.EX)
        assert await first.acquire()
        assert first.lvb_valid and first.lvb == bytes(64)
        first.write_lvb(b"v1")
        token = first.token
        await first.release()
        second = b.lock("d", "r", Mode.PR)
        assert await second.acquire()
        assert second.lvb.rstrip(b"\0") == b"v1" and second.lvb_seq == 1
        assert second.token is not None and token is not None and second.token > token
        with pytest.raises(DlmError) as err:
            second.write_lvb(b"x")          # a PR holder may not write
        assert err.value.errno == errno.EBADF


async def test_timeout_returns_false_and_leaves_nothing_queued(dlm_server: Server) -> None:
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b:
        assert await a.lock("d", "r", Mode.EX).acquire()
        waiter = b.lock("d", "r", Mode.EX)
        started = time.monotonic()
        assert not await waiter.acquire(timeout=0.3)
        assert time.monotonic() - started > 0.25  # it waited its timeout (no upper bound: load)
        assert await waiting_on(dlm_server.url, "r") == []
        assert not await waiter.acquire(blocking=False)       # trylock
        assert await waiting_on(dlm_server.url, "r") == []


async def test_cancel_and_cancel_scope_take_the_request_back(dlm_server: Server) -> None:
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b:
        holder = a.lock("d", "r", Mode.PR)
        assert await holder.acquire()
        waiter = b.lock("d", "r", Mode.EX)
        results: list[bool] = []
        async with anyio.create_task_group() as tasks:
            async def wait() -> None:
                results.append(await waiter.acquire())
            tasks.start_soon(wait)
            while await waiting_on(dlm_server.url, "r") == []:
                await anyio.sleep(0.01)
            await waiter.cancel()
        assert results == [False] and not waiter.held
        with anyio.move_on_after(0.2):
            await waiter.acquire()
        assert not waiter.held
        assert await waiting_on(dlm_server.url, "r") == []
        # A conversion cancelled keeps the old mode.
        other = b.lock("d", "r", Mode.PR)
        assert await other.acquire()
        assert not await holder.convert(Mode.EX, timeout=0.2)
        assert holder.mode == Mode.PR


async def test_basts_reach_the_holder(dlm_server: Server) -> None:
    seen: list[Mode] = []
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b:
        holder = a.lock("d", "r", Mode.PR, on_blocking=lambda lock, mode: seen.append(mode))
        assert await holder.acquire()
        assert await b.lock("d", "r", Mode.CR).acquire()       # compatible: no bast
        assert not await b.lock("d", "r", Mode.EX).acquire(timeout=0.3)
        assert seen == [Mode.EX] and holder.blocking == Mode.EX


async def test_conversion_deadlock_through_the_service(dlm_server: Server) -> None:
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b:
        la, lb = a.lock("d", "r", Mode.PR), b.lock("d", "r", Mode.PR)
        assert await la.acquire() and await lb.acquire()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(la.convert, Mode.EX)
            while await waiting_on(dlm_server.url, "r") == []:
                await anyio.sleep(0.01)
            with pytest.raises(DlmError) as err:
                await lb.convert(Mode.EX)
            assert err.value.errno == errno.EDEADLK
            assert await lb.convert(Mode.EX, flags=Flag.CONVDEADLK, timeout=0.5) is False
            assert lb.mode == Mode.NL                  # demoted, and la got its EX
            await la.release()
        assert await lb.convert(Mode.EX, timeout=2)


async def test_dropped_connection_releases_and_grants_waiters_in_order(dlm_server: Server) -> None:
    order: list[str] = []
    async with connect(dlm_server.url, name="b") as b, connect(dlm_server.url, name="c") as c:
        async with connect(dlm_server.url, name="a") as a:
            assert await a.lock("d", "r", Mode.EX).acquire()
            lb, lc = b.lock("d", "r", Mode.EX), c.lock("d", "r", Mode.EX)

            locks = {"b": lb, "c": lc}

            async def take(who: str) -> None:
                lock = locks[who]
                assert await lock.acquire(timeout=5)
                order.append(who)
                await anyio.sleep(0.05)
                await lock.release()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(take, "b")
                while len(await waiting_on(dlm_server.url, "r")) < 1:
                    await anyio.sleep(0.01)
                tasks.start_soon(take, "c")
                while len(await waiting_on(dlm_server.url, "r")) < 2:
                    await anyio.sleep(0.01)
                await a.aclose()                     # a's connection drops with its EX
        assert order == ["b", "c"]


async def test_o2dlm_shaped_api(dlm_server: Server) -> None:
    async with connect(dlm_server.url) as a, connect(dlm_server.url) as b:
        ctx_a, ctx_b = await a.initialize("o2"), await b.initialize("o2")
        await ctx_a.lock("res", Mode.EX)
        with pytest.raises(RecursiveLock):
            await ctx_a.lock("res", Mode.PR)
        with pytest.raises(TrylockFailed):
            await ctx_b.lock("res", Mode.PR, trylock=True)
        assert await ctx_a.write_lvb("res", b"x" * 100) == 64
        with pytest.raises(BusyLock):
            await ctx_a.drop("res")
        await ctx_a.unlock("res")
        await ctx_b.lock("res", "PR")
        assert await ctx_b.read_lvb("res") == b"x" * 64
        with pytest.raises(BusyLock):
            await ctx_a.drop("res")                 # b holds it
        await ctx_b.destroy()
        with pytest.raises(DlmError) as err:
            await ctx_a.lock(".reserved", Mode.PR)
        assert err.value.errno == errno.EINVAL
        await ctx_a.destroy()
        status = await a.status()
        assert status["domains"] == []


async def test_lvb_invalid_error_in_o2dlm_api(dlm_server: Server) -> None:
    async with connect(dlm_server.url) as a:
        ctx = await a.initialize("o2")
        await ctx.lock("res", Mode.EX)
        await ctx.write_lvb("res", b"data")
        lock = ctx._locks["res"]
        await lock.release(invalidate_lvb=True)
        del ctx._locks["res"]
        await ctx.lock("res", Mode.PR)
        with pytest.raises(LvbInvalid):
            await ctx.read_lvb("res")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_embedded_service_api(short_tmp: Path) -> None:
    path = str(short_tmp / "embedded.sock")
    service = await start_dlm_service(f"unix://{path}")
    try:
        async with connect(path) as client:
            lock = client.lock("d", "r", Mode.EX)
            assert await lock.acquire()
            assert client.server["pid"] == os.getpid()
            with pytest.raises(FileExistsError):
                await start_dlm_service(path)          # refuses to steal a live socket
    finally:
        await service.close()
    assert not os.path.exists(path)
    service = await start_dlm_service(path)            # and reuses a dead one
    await service.close()


async def test_release_then_close_at_once_keeps_the_value_block(dlm_server: Server) -> None:
    """release() does not wait for the service; closing right after it must still have the
    unlock (and its value block) handled, not the lock dropped as if its holder had died.
    The waiter asks at varying moments around the release, so that the service sometimes
    writes its bast to the holder's connection after the holder has closed it (a write that
    fails there makes the service drop the connection before reading what it sent last)."""
    await _release_then_close(dlm_server.url, prompt_unlock=False)


async def test_release_wait_and_sync_make_it_visible_to_others(dlm_server: Server) -> None:
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b:
        for wait in (True, False):
            lock = a.lock("d", "r", Mode.EX)
            assert await lock.acquire()
            if wait:
                await lock.release(wait=True)
            else:
                await lock.release()
                await a.sync()
            other = b.lock("d", "r", Mode.EX)
            assert await other.acquire(blocking=False)  # free for another connection now
            await other.release(wait=True)


async def test_many_clients_contending_on_one_lock_all_make_progress(dlm_server: Server) -> None:
    """Eight connections taking turns on one EX lock, as bench/dlm.py's 8-client row does:
    every acquire is granted within a bound (a lost wakeup or a stalled writer would time out
    here), no two holders overlap, and every client finishes its cycles."""
    inside = 0
    cycles = [0] * 8

    async def worker(i: int) -> None:
        nonlocal inside
        async with connect(dlm_server.url, name=f"w{i}") as client:
            lock = client.lock("d", "r", Mode.EX)
            for _ in range(100):
                assert await lock.acquire(timeout=5)
                inside += 1
                assert inside == 1
                await anyio.sleep(0)
                inside -= 1
                await lock.release()
                cycles[i] += 1

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tasks:
            for i in range(8):
                tasks.start_soon(worker, i)
    assert cycles == [100] * 8


async def test_prompt_unlock_release_wait_makes_it_visible_at_once(dlm_server: Server) -> None:
    """release(wait=True) on a prompt-unlock connection does not wait for the reply, yet
    another connection's trylock right after it succeeds (as dlmfs's close needs)."""
    async with connect(dlm_server.url, name="a", prompt_unlock=True) as a, \
            connect(dlm_server.url, name="b") as b:
        assert a.prompt_unlock and not b.prompt_unlock
        for i in range(100):
            lock = a.lock("d", "r", Mode.EX)
            assert await lock.acquire()
            lock.write_lvb(f"v{i}".encode())
            await lock.release(wait=True)
            other = b.lock("d", "r", Mode.EX)
            assert await other.acquire(blocking=False)
            assert other.lvb.rstrip(b"\0") == f"v{i}".encode()
            await other.release(wait=True)


async def test_prompt_unlock_then_close_at_once_keeps_the_value_block(dlm_server: Server) -> None:
    """A prompt-unlock release is quiet (no reply); closing right after it must still have it
    handled as an unlock (value block stored), not as the holder's death (invalidated) -- also
    when the service writes to the closing connection meanwhile (the bast for a waiter)."""
    await _release_then_close(dlm_server.url, prompt_unlock=True)


async def _release_then_close(url: str, prompt_unlock: bool) -> None:
    """Twenty rounds of: hold EX with a value block, let a waiter queue (or have its request
    in flight), release, close at once; the waiter must get the lock with the value block.
    A prompt-unlock holder releases quietly and waits (release(wait=True)), as dlmfs does."""
    async with connect(url, name="waiter") as w:
        for i in range(20):
            async with connect(url, name="holder", prompt_unlock=prompt_unlock) as h:
                lock = h.lock("d", "r", Mode.EX)
                assert await lock.acquire()
                lock.write_lvb(f"v{i}".encode())
                waiter = w.lock("d", "r", Mode.EX)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(waiter.acquire)
                    if i % 2:
                        while lock.blocking is None:    # the waiter is queued behind us
                            await anyio.sleep(0.001)
                    else:
                        await anyio.sleep(0.0005 * (i % 4))  # the waiter's request in flight
                    await lock.release(wait=prompt_unlock)
                    await h.aclose()
            assert waiter.held and waiter.lvb_valid
            assert waiter.lvb.rstrip(b"\0") == f"v{i}".encode()
            await waiter.release(wait=prompt_unlock)


async def test_contenders_lists_holders_then_converting_then_waiting(dlm_server: Server) -> None:
    """kazoo's `contenders()`: every owner with a lock on the resource, in queue order, an
    orphan (a PERSISTENT lock whose owner went away) named after its dead owner."""
    me = os.getpid()
    async with connect(dlm_server.url, name="gone") as gone:
        assert await gone.lock("d", "r", Mode.PR, persistent=True).acquire()
    async with connect(dlm_server.url, name="a") as a, connect(dlm_server.url, name="b") as b, \
            connect(dlm_server.url, name="c") as c:
        holder = a.lock("d", "r", Mode.PR)
        assert await holder.acquire()
        assert await holder.contenders() == [f"orphan of gone[{me}]", f"a[{me}]"]
        converter = b.lock("d", "r", Mode.PR)
        assert await converter.acquire()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(converter.convert, Mode.EX)
            while await waiting_on(dlm_server.url, "r") == []:
                await anyio.sleep(0.01)
            tasks.start_soon(c.lock("d", "r", Mode.EX).acquire)
            while len(await waiting_on(dlm_server.url, "r")) < 2:
                await anyio.sleep(0.01)
            assert await c.lock("d", "r").contenders() == [
                f"orphan of gone[{me}]", f"a[{me}]", f"b[{me}]", f"c[{me}]"]
            tasks.cancel_scope.cancel()
        assert await a.lock("d", "nobody").contenders() == []
        assert await a.lock("elsewhere", "r").contenders() == []
        await a.purge("d")
