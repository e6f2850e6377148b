"""The lock manager under hostile clients: what one connection sends can close that
connection only, never another's, and nothing one client does grows the service without bound
(issue 10, item 10). Resource checks read the service process's /proc, never the clock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from tests.dlm.conftest import Server
from tests.dlm.test_protocol import Raw

from minidisk.dlm import protocol
from minidisk.dlm.client import connect
from minidisk.dlm.engine import DlmError
from minidisk.dlm.modes import Mode

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


def wait_hang_up(raw: Raw) -> None:
    """Wait until the service closes this connection (reading and dropping whatever it sent
    first); a TimeoutError if it does not."""
    raw.sock.settimeout(10)
    try:
        while raw.sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass


def wait_taken(raw: Raw) -> None:
    """Wait until the service has read everything this connection wrote (or hung up)."""
    deadline = time.monotonic() + 10
    unread = bytearray(4)
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(raw.sock.fileno(), termios.TIOCOUTQ, unread)
        except OSError:
            return
        if int.from_bytes(unread, sys.byteorder) == 0:
            return
        time.sleep(0.01)
    raise TimeoutError("the service did not read what was sent")


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
    "json-pid-out-of-range": (_json_frame('{"id":9,"op":"purge","pid":1e999}'), errno.EINVAL),
    "json-domain-not-a-string": (_json_frame('{"id":9,"op":"join","domain":[]}'), errno.EINVAL),
    "json-op-gone": (_json_frame(  # the JSON form of lock went: no client sent it
        '{"id":9,"op":"lock","ref":1,"domain":"d","name":"x","mode":"EX"}'), errno.EINVAL),
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
                wait_hang_up(b)
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


def vm_kib(pid: int, field: str) -> int:
    """A VmRSS/VmHWM-style line of /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _flood(raw: Raw, frame: bytes, total: int) -> int:
    """Write `frame` over and over, never reading, until `total` bytes are written or the
    service hangs up; how many bytes it took."""
    chunk = frame * (65536 // len(frame))
    sent = 0
    raw.sock.settimeout(30)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < total:
            raw.sock.sendall(chunk)
            sent += len(chunk)
    return sent


@pytest.mark.parametrize("features", [["prompt-unlock"], []], ids=["prompt-unlock", "plain"])
def test_a_client_that_floods_and_never_reads_is_cut_off(dlm_server: Server,
                                                         features: list[str]) -> None:
    """P floods requests that each have a reply (a CANCEL of a lock it does not have: an
    ERROR), never reading one; W keeps asking, so a prompt-unlock P is drained during W's
    wake-ups too. Draining must not keep reading as long as P keeps writing (its replies
    piling up unsent): P is cut off once its unread replies pass the write-buffer limit, and
    the service's peak memory stays within a few times that limit."""
    pid = dlm_server.process.pid
    p, w = Raw(dlm_server), Raw(dlm_server)
    try:
        assert p.call({"id": 1, "op": "hello", "name": "p", "features": features})
        assert w.call({"id": 1, "op": "hello", "name": "w"})["ok"]
        before = vm_kib(pid, "VmHWM")
        stop = threading.Event()

        def keep_asking() -> None:
            call = 2
            while not stop.is_set():
                assert w.call({"id": call, "op": "hello", "name": "w"})["ok"]
                call += 1

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        cancel = protocol.CANCEL_FRAME.pack(protocol.CANCEL_BODY.size, protocol.CANCEL, 5, 77)
        total = 64 << 20
        sent = _flood(p, cancel, total)
        stop.set()
        asker.join(30)
        grown_mib = (vm_kib(pid, "VmHWM") - before) / 1024
        print(f"P wrote {sent >> 20} MiB; the service's peak grew {grown_mib:.1f} MiB")
        assert sent < total, f"P wrote {sent >> 20} MiB of requests, never cut off"
        assert grown_mib < 48, f"the service grew by {grown_mib:.0f} MiB"
        wait_hang_up(p)
        assert w.call({"id": 0, "op": "hello", "name": "w"})["ok"]
    finally:
        p.close()
        w.close()


def test_partial_frames_cost_the_service_no_more_than_the_request_limit(
        dlm_server: Server) -> None:
    """Forty connections each announce a frame of almost a megabyte (under the old limit of
    every frame, `MAX_FRAME`) and send most of it: the service must refuse each on its header
    (a request is at most `MAX_REQUEST`), not keep 40 MiB of partial requests."""
    pid = dlm_server.process.pid
    length = protocol.MAX_FRAME - 1
    raws = [Raw(dlm_server) for _ in range(40)]
    try:
        for raw in raws:  # every connection accepted before the measure starts
            assert raw.call({"id": 1, "op": "hello", "name": "partial"})["ok"]
        before = vm_kib(pid, "VmRSS")
        for raw in raws:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                raw.send(struct.pack(">IB", length, protocol.JSON) + b" " * (length - 100))
        for raw in raws:
            wait_taken(raw)
        grown_mib = (vm_kib(pid, "VmRSS") - before) / 1024
        print(f"40 partial frames: the service grew {grown_mib:.1f} MiB")
        assert grown_mib < 8, f"the service grew by {grown_mib:.0f} MiB"
        for raw in raws:
            wait_hang_up(raw)
    finally:
        for raw in raws:
            raw.close()


HOSTILE_REPLIES = {
    "header-of-4-gib": struct.pack(">IB", 0xFFFFFFFF, protocol.JSON),
    "json-id-a-list": _json_frame('{"id":[1],"ok":true}'),
    "json-nested-too-deep": _json_frame("[" * 100_000),
}


@pytest.mark.parametrize("reply", list(HOSTILE_REPLIES), ids=list(HOSTILE_REPLIES))
@pytest.mark.anyio
async def test_a_hostile_service_s_reply_ends_the_connection_not_the_client(
        short_tmp: Path, reply: str, anyio_backend: str) -> None:
    """Whatever a service answers, the client neither allocates what a header announces nor
    lets a bad reply escape its reader: the call fails (ENOTCONN), nothing hangs."""
    path = str(short_tmp / "hostile.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(65536)  # the hello
        conn.sendall(HOSTILE_REPLIES[reply])  # and the connection stays open

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        before = vm_kib(os.getpid(), "VmRSS")
        with anyio.fail_after(10), pytest.raises(DlmError) as err:
            async with connect(f"unix://{path}", name="victim"):
                pass
        assert err.value.errno == errno.ENOTCONN
        assert vm_kib(os.getpid(), "VmRSS") - before < 64 << 10  # KiB: no 4 GiB buffer
    finally:
        server.join(10)
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_grant_to_a_client_that_just_hung_up_does_not_hurt_the_granter(
        dlm_server: Server, anyio_backend: str) -> None:
    """X waits for Y's lock and closes its socket; Y unlocks in the same instant. The
    service sees X's end of stream first (its transport is closed from then on, though not
    yet reported lost) and then Y's unlock, which grants X's queued request: writing that
    grant to X's closed transport must not fail Y's wake-up, and so Y's connection."""
    async with connect(dlm_server.url, name="y", prompt_unlock=True) as y:
        lock = y.lock("d", "r", Mode.EX)
        kept = y.lock("d", "kept", Mode.EX)
        assert await lock.acquire() and await kept.acquire()
        x = Raw(dlm_server)
        try:
            x.send(protocol.encode_lock(2, 1, 5, 0, "d", "r"))
            assert x.next()[0] == protocol.OK  # queued behind Y
            assert x.call({"id": 3, "op": "hello", "name": "x"})["ok"]  # X reported last
            with frozen(dlm_server.process.pid):
                x.sock.close()
                await lock.release(wait=True)
        finally:
            x.close()
        await y.sync()
        assert kept.held
        async with connect(dlm_server.url, name="witness") as witness:
            assert not await witness.lock("d", "kept", Mode.EX).acquire(blocking=False)


def test_a_drain_never_reads_a_socket_that_is_no_longer_its_connection_s(
        dlm_server: Server) -> None:
    """X (prompt-unlock) closes; N connects and says hello; W asks something -- all while
    the service is stopped, so it then handles X's end of stream, accepts N (which may get
    X's old descriptor number), and takes W's request, draining prompt-unlock connections
    first. X must not be drained any more: reading its old descriptor would steal N's hello
    (N would wait for ever, its request handled as X's)."""
    x, w = Raw(dlm_server), Raw(dlm_server)
    n = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert w.call({"id": 1, "op": "hello", "name": "w"})["ok"]
        assert x.call({"id": 1, "op": "hello", "name": "x", "features": ["prompt-unlock"]})
        with frozen(dlm_server.process.pid):
            x.sock.close()
            n.connect(dlm_server.path)
            n.sendall(protocol.encode({"id": 7, "op": "hello", "name": "n"}))
            w.send(protocol.encode({"id": 2, "op": "hello", "name": "w"}))
        assert protocol.decode_json(w.next())["id"] == 2
        n.settimeout(10)
        (body,) = protocol.FrameDecoder().feed(n.recv(65536))
        assert protocol.decode_json(body)["id"] == 7
    finally:
        x.close()
        w.close()
        n.close()
