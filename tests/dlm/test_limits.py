"""What one client can make the lock manager hold or send: a status of any size arrives whole
(in pages), and per-client caps answer a client that goes past them with an error instead of
letting it grow the service (issue 10, item 10)."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from tests.dlm.conftest import Server, dlm_cli, serving
from tests.dlm.test_protocol import Raw

from minidisk.dlm import protocol
from minidisk.dlm.client import connect
from minidisk.dlm.engine import DlmError
from minidisk.dlm.limits import Limits
from minidisk.dlm.modes import Mode

pytestmark = pytest.mark.timeout(120)


def hold(server: Server, resources: list[tuple[str, str]]) -> Raw:
    """A connection (with a long name, so its locks weigh more in a status) holding a PR
    lock on each (domain, name), asked all at once."""
    holder = Raw(server)
    holder.sock.settimeout(120)  # each new lock is checked against every holder of its resource
    assert holder.call({"id": 1, "op": "hello", "name": "holder-" + "h" * 90,
                        "features": ["granted-reply"]})["ok"]
    holder.send(b"".join(protocol.encode_lock(ref, ref, Mode.PR, 0, domain, name)
                         for ref, (domain, name) in enumerate(resources, start=1)))
    for _ in resources:
        assert holder.next()[0] == protocol.GRANTED
    return holder


def test_a_status_larger_than_a_frame_arrives_whole_in_the_api_and_the_cli(
        dlm_server: Server) -> None:
    names = [f"r{i:05}-" + "n" * 50 for i in range(3000)]
    holder = hold(dlm_server, [("big", name) for name in names])

    async def main() -> None:
        async with connect(dlm_server.url, name="observer") as observer:
            status = await observer.status()
            assert len(json.dumps(status, separators=(",", ":"))) > protocol.MAX_FRAME
            (domain,) = status["domains"]
            assert [res["name"] for res in domain["resources"]] == names
            assert all(len(res["granted"]) == 1 for res in domain["resources"])
            text = await anyio.to_thread.run_sync(dlm_cli, dlm_server, "status")
            listed = [line.split()[1] for line in text.splitlines()
                      if line.startswith("  resource ")]
            assert listed == names
            assert text.count("    granted    PR") == len(names)
            raw = json.loads(await anyio.to_thread.run_sync(dlm_cli, dlm_server, "status",
                                                            "--json"))
            assert raw["domains"] == status["domains"]

    try:
        anyio.run(main)
    finally:
        holder.close()


def test_one_resource_whose_locks_fill_several_pages_arrives_whole(dlm_server: Server) -> None:
    holder = hold(dlm_server, [("hot", "one")] * 6000)

    async def main() -> None:
        async with connect(dlm_server.url, name="observer") as observer:
            status = await observer.status()
            assert len(json.dumps(status, separators=(",", ":"))) > protocol.MAX_FRAME
            (domain,) = status["domains"]
            (res,) = domain["resources"]
            lkids = [lk["lkid"] for lk in res["granted"]]
            assert len(lkids) == len(set(lkids)) == 6000 and lkids == sorted(lkids)
            assert res["lvb"]["seq"] == 0
            assert "continued" not in res and "continued" not in domain

    try:
        anyio.run(main)
    finally:
        holder.close()


@pytest.fixture
def capped(short_tmp: Path) -> Iterator[Server]:
    """A service with small limits, set on the command line."""
    with serving(str(short_tmp / "capped.sock"), "--max-clients", "4",
                 "--max-prompt-clients", "2",
                 "--max-locks-per-client", "100", "--max-domains-per-client", "3",
                 "--max-locks", "150", "--max-resources", "120") as server:
        yield server


def refused(err: pytest.ExceptionInfo[DlmError], code: int) -> str:
    assert err.value.errno == code, err.value
    return str(err.value)


def test_a_client_past_its_lock_limit_is_refused_and_keeps_what_it_has(capped: Server) -> None:
    async def main() -> None:
        async with connect(capped.url, name="greedy") as greedy, \
                connect(capped.url, name="other") as other:
            held = [greedy.lock("d", f"r{i}", Mode.EX) for i in range(100)]
            for lock in held:
                assert await lock.acquire()
            with pytest.raises(DlmError) as err:
                await greedy.lock("d", "one-more", Mode.EX).acquire()
            assert "this client has 100 locks" in refused(err, errno.ENOLCK)
            assert all(lock.held for lock in held)
            assert await other.lock("d", "mine", Mode.EX).acquire()  # others are not
            await held[0].release(wait=True)
            assert await greedy.lock("d", "one-more", Mode.EX).acquire()  # room again
            # Everyone together: 150 locks at most (on one resource: resources are capped
            # at 120).
            theirs = [other.lock("d", "shared", Mode.PR) for _ in range(50)]
            for lock in theirs[:-1]:
                assert await lock.acquire()
            with pytest.raises(DlmError) as err:
                await theirs[-1].acquire()
            assert "the lock manager holds 150 locks" in refused(err, errno.ENOLCK)
            await greedy.sync()  # both connections still alive

    anyio.run(main)


def test_a_client_past_its_domain_limit_is_refused(capped: Server) -> None:
    async def main() -> None:
        async with connect(capped.url, name="joiner") as client:
            for name in ("a", "b"):
                await client.join(name)
            assert await client.lock("c", "r", Mode.PR).acquire()  # a lock joins too
            with pytest.raises(DlmError) as err:
                await client.join("d")
            assert "this client is in 3 domains" in refused(err, errno.EDQUOT)
            with pytest.raises(DlmError) as err:
                await client.lock("d", "r", Mode.PR).acquire()
            refused(err, errno.EDQUOT)
            assert await client.lock("a", "r", Mode.PR).acquire()  # its own domains: fine
            await client.leave("b")
            await client.join("d")
            assert "d" in [dom["name"] for dom in (await client.status())["domains"]]

    anyio.run(main)


def test_lock_free_resources_are_bounded_too(capped: Server) -> None:
    """A resource outlives its locks (it keeps the value block), so lock+unlock on ever new
    names would grow the service for ever: past --max-resources a new one is refused."""
    async def main() -> None:
        async with connect(capped.url, name="namer") as client:
            for i in range(120):
                lock = client.lock("d", f"r{i}", Mode.EX)
                assert await lock.acquire()
                await lock.release()
            with pytest.raises(DlmError) as err:
                await client.lock("d", "r120", Mode.EX).acquire()
            assert "120 resources" in refused(err, errno.ENOSPC)
            (domain,) = (await client.status())["domains"]
            assert len(domain["resources"]) == 120
            assert await client.lock("d", "r7", Mode.EX).acquire()  # existing ones: fine
            await client.drop("d", "r8")
            assert await client.lock("d", "r120", Mode.EX).acquire()

    anyio.run(main)


def test_clients_past_the_connection_limit_are_told_and_hung_up(capped: Server) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            first = [await stack.enter_async_context(connect(capped.url, name=f"c{i}"))
                     for i in range(4)]
            with pytest.raises(DlmError) as err:
                async with connect(capped.url, name="fifth"):
                    pass
            assert "serves 4 clients" in refused(err, errno.EUSERS)
            await first[0].sync()
        async with connect(capped.url, name="later") as later:  # room again once they left
            await later.sync()

    anyio.run(main)


def test_the_default_domain_limit_holds(dlm_server: Server) -> None:
    async def main() -> None:
        async with connect(dlm_server.url, name="joiner") as client:
            for i in range(Limits.domains_per_client):
                await client.join(f"d{i}")
            with pytest.raises(DlmError) as err:
                await client.join("one-more")
            refused(err, errno.EDQUOT)

    anyio.run(main)


def test_prompt_unlock_is_granted_to_a_few_connections_only(capped: Server) -> None:
    """Every prompt-unlock connection costs each request of anyone else a look at its
    socket: past --max-prompt-clients a hello gets the feature refused, and that client
    still works (its release(wait=True) waits for the reply instead)."""
    async def main() -> None:
        async with connect(capped.url, name="p1", prompt_unlock=True) as p1, \
                connect(capped.url, name="p2", prompt_unlock=True) as p2, \
                connect(capped.url, name="p3", prompt_unlock=True) as p3:
            assert (p1.prompt_unlock, p2.prompt_unlock, p3.prompt_unlock) == (
                True, True, False)
            lock = p3.lock("d", "r", Mode.EX)
            assert await lock.acquire()
            await lock.release(wait=True)
            assert await p1.lock("d", "r", Mode.EX).acquire(blocking=False)
            await p2.sync()  # a hello without features keeps p2's
            assert p2.prompt_unlock
        async with connect(capped.url, name="p4", prompt_unlock=True) as p4:
            assert p4.prompt_unlock  # the others are gone

    anyio.run(main)


def test_a_refused_client_can_still_send_then_reads_why_and_the_end(capped: Server) -> None:
    """Past the connection limit the service sends the refusal and ends the stream, but
    keeps reading for a while: a client that writes its hello only after the refusal has
    arrived must not get EPIPE (which made connect() report "connection lost" instead of
    EUSERS when the service had already closed)."""
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for i in range(4):
                await stack.enter_async_context(connect(capped.url, name=f"c{i}"))
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(capped.socket)
                frame = b""
                while len(frame) < protocol.ERROR_HEAD.size:
                    frame += sock.recv(4096)
                length, kind, call_id, err = protocol.ERROR_HEAD.unpack_from(frame)
                assert (kind, call_id, err) == (protocol.ERROR, 0, errno.EUSERS)
                while len(frame) < 4 + length:
                    frame += sock.recv(4096)
                sock.sendall(b"\0" * 64)  # a late hello: not an EPIPE
                assert sock.recv(4096) == b""  # then the end of the stream

    anyio.run(main)
