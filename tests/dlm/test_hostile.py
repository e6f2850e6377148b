"""The lock manager under hostile clients: what one connection sends can close that
connection only, never another's, and nothing one client does grows the service without bound
(issue 10, item 10). Resource checks read the service process's /proc, never the clock."""

from __future__ import annotations

import errno
import os
import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from minidisk.dlm import protocol
from minidisk.dlm.client import connect
from minidisk.dlm.modes import Mode

from .conftest import Server  # type: ignore[import-not-found]
from .test_protocol import Raw  # type: ignore[import-not-found]

pytestmark = pytest.mark.timeout(60)


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The service stopped (SIGSTOP) for the block: what clients write meanwhile waits in its
    sockets, and it finds all of it ready at once, in the order it was written, when it runs
    again (epoll reports descriptors in the order they became ready)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def hung_up(raw: Raw) -> bool:
    """Has the service closed this connection? (It sends nothing else to these.)"""
    raw.sock.settimeout(10)
    try:
        return raw.sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _lock_frame_with_a_domain_longer_than_the_frame() -> bytes:
    frame = protocol.encode_lock(7, 1, 5, 0, "d", "r")
    # The domain length field (after length, kind, id, ref, mode, flags) says 200 bytes.
    at = protocol.LOCK_HEAD.size - protocol.NAME_LENGTH.size
    return frame[:at] + protocol.NAME_LENGTH.pack(200) + frame[at + 2:]


def _json_frame(text: str) -> bytes:
    body = text.encode()
    return struct.pack(">IB", len(body) + 1, protocol.JSON) + body


# name: (frame, what B gets: None for a hang-up, else the errno of its error reply)
MALFORMED: dict[str, tuple[bytes, int | None]] = {
    "lock-names-past-the-frame": (_lock_frame_with_a_domain_longer_than_the_frame(), None),
    "json-nested-too-deep": (_json_frame("[" * 100_000), None),
    "frame-over-the-request-limit": (struct.pack(">IB", protocol.MAX_REQUEST + 1, 0), None),
    "json-ref-out-of-range": (_json_frame(
        '{"id":9,"op":"lock","ref":1e999,"domain":"d","name":"x","mode":"EX"}'), errno.EINVAL),
    "json-mode-not-a-name": (_json_frame(
        '{"id":9,"op":"lock","ref":1,"domain":"d","name":"x","mode":[]}'), errno.EINVAL),
}


@pytest.mark.parametrize("bad", list(MALFORMED), ids=list(MALFORMED))
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_bad_frame_drained_for_another_connection_is_its_sender_s_alone(
        dlm_server: Server, bad: str, anyio_backend: str) -> None:
    """A holds a lock on a prompt-unlock connection (as dlmfs does) and writes an unlock; B,
    also prompt-unlock (anyone may ask), writes a malformed frame just after. The service
    finds A's data first and, before handling it, drains B: B's frame is read during A's
    wake-up. B must be hung up (or answered EINVAL, for a well-formed request with bad
    arguments), and A must keep its connection and its other lock."""
    frame, expected = MALFORMED[bad]
    async with connect(dlm_server.url, name="a", prompt_unlock=True) as a, \
            connect(dlm_server.url, name="witness") as witness:
        assert a.prompt_unlock
        kept = a.lock("d", "kept", Mode.EX)
        await kept.acquire()
        released = a.lock("d", "released", Mode.EX)
        await released.acquire()
        b = Raw(dlm_server)
        try:
            assert b.call({"id": 1, "op": "hello", "name": "b",
                           "features": ["prompt-unlock"]})["ok"]
            # A's round trip comes last: epoll keeps a descriptor it has just reported at
            # the head of its ready list, and B's must not be there.
            await a.sync()
            with frozen(dlm_server.process.pid):
                await released.release(wait=True)  # prompt-unlock: done once written
                b.send(frame)
            if expected is None:
                assert hung_up(b)
            else:
                reply = protocol.decode_json(b.next())
                assert (reply["id"], reply["ok"], reply["errno"]) == (9, False, expected)
                assert b.call({"id": 10, "op": "hello", "name": "b"})["ok"]
        finally:
            b.close()
        await a.sync()  # A's connection is alive ...
        assert kept.held
        # ... and still holds its lock.
        assert not await witness.lock("d", "kept", Mode.EX).acquire(blocking=False)
        free = witness.lock("d", "released", Mode.EX)
        assert await free.acquire(blocking=False)  # and its unlock was handled
        await free.release()
