"""The NBD server's memory under hostile and greedy clients (issue 10, items 7 and 14).

Every figure is the server process's own resident memory (/proc/PID/status: VmRSS, and
VmHWM, its peak since /proc/PID/clear_refs was reset), never a time. Servers run as
`minidisk serve -s` subprocesses (tests/nbd/conftest.py).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.harness import Server
from tests.nbd.conftest import StartServer
from tests.nbd.nbd_helpers import RawClient, read_data

from minidisk.nbd import protocol as p

pytestmark = pytest.mark.timeout(240)

KiB, MiB = 1 << 10, 1 << 20


def _status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0]) * KiB


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def settle(pid: int, deadline_s: float = 5.0) -> int:
    """VmRSS once it stops growing (the server has taken in what it was sent)."""
    last, deadline = rss(pid), time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss(pid)
        if now <= last:
            return now
        last = now
    return last


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def settle_cpu(pid: int, deadline_s: float = 120.0) -> None:
    """Wait until the server has done what it was sent: its CPU time stops growing."""
    last, quiet, deadline = cpu_ticks(pid), 0, time.monotonic() + deadline_s
    while quiet < 3 and time.monotonic() < deadline:  # three quiet half seconds in a row
        time.sleep(0.5)
        now = cpu_ticks(pid)
        quiet = quiet + 1 if now == last else 0
        last = now


def wait_for(predicate: Callable[[], bool], deadline_s: float = 30.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def header(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def connect(srv: Server, name: str = "disk", structured: bool = True) -> RawClient:
    c = RawClient(srv.socket, timeout=60)
    c.handshake()
    c.go(name, structured=structured, meta=structured)
    return c


def read_simple_reply(c: RawClient, length: int) -> tuple[int, int, bytes]:
    magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(16))
    assert magic == p.SIMPLE_REPLY_MAGIC
    return error, cookie, c.recv_exact(length) if error == 0 else b""


# -- item 7: check before allocating --------------------------------------------------------


def test_invalid_write_headers_allocate_nothing(start_server: StartServer) -> None:
    """A WRITE header announcing 128 MiB on a read-only export allocated the 128 MiB before
    any check (12 connections: +1.5 GiB); the payload must be drained, not stored."""
    srv = start_server("--read-only", "--memory", "disk=1M")
    pid = srv.proc.pid
    clients = [connect(srv) for _ in range(12)]
    try:
        base = settle(pid)
        reset_peak(pid)
        for i, c in enumerate(clients):
            c.pending[i] = (p.CMD_WRITE, 128 * MiB)
            c.send(header(p.CMD_WRITE, i, 0, 128 * MiB) + bytes(256 * KiB))
        settle(pid)
        grown = peak(pid) - base
        assert grown < 64 * MiB, f"12 refused WRITE headers cost {grown >> 20} MiB"
        # The stream stays in sync: the rest of the payload is drained, EPERM comes back
        # once, and the next request is parsed as a request.
        c = clients[0]
        c.pending[7] = (p.CMD_READ, 512)
        c.send(bytes(128 * MiB - 256 * KiB) + header(p.CMD_READ, 7, 0, 512))
        replies = c.replies(2)
        assert replies[0].errno == p.NBD_EPERM
        assert replies[7].errno == 0 and read_data(replies[7], 0, 512) == bytes(512)
    finally:
        for c in clients:
            c.close()
    assert srv.alive()


def test_valid_writes_wait_for_the_server_budget(start_server: StartServer) -> None:
    """16 connections each announce a valid 32 MiB WRITE and send only 64 KiB of it: only
    as many payloads as the server-wide budget allows are taken in; the others wait in
    their sockets, and every WRITE succeeds once its payload arrives."""
    srv = start_server("--payload-budget", "64M", "--null", "disk=1G")
    pid = srv.proc.pid
    size = 32 * MiB
    clients = [connect(srv, structured=False) for _ in range(16)]
    try:
        base = settle(pid)
        reset_peak(pid)
        for i, c in enumerate(clients):
            c.send(header(p.CMD_WRITE, i, i * size, size) + b"\x5a" * (64 * KiB))
        settle(pid)
        grown = peak(pid) - base
        assert grown < 64 * MiB + 48 * MiB, f"16 pending WRITEs cost {grown >> 20} MiB"
        rest = b"\x5a" * (size - 64 * KiB)
        senders = [threading.Thread(target=c.send, args=(rest,)) for c in clients]
        for t in senders:
            t.start()
        for i, c in enumerate(clients):
            error, cookie, _ = read_simple_reply(c, 0)
            assert (error, cookie) == (0, i)
        for t in senders:
            t.join()
        assert peak(pid) - base < 64 * MiB + 48 * MiB
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("stall", ["stops sending", "stops reading"])
def test_a_client_holding_the_budget_without_progress_is_dropped(
        start_server: StartServer, stall: str) -> None:
    """With a server-wide budget, a client that takes all of it and then stops (sends half
    a WRITE payload, or stops reading its READ replies) would stall every other client for
    ever: it is dropped after --peer-timeout without progress, and the others go on."""
    srv = start_server("--payload-budget", "16M", "--peer-timeout", "2",
                       "--memory", "disk=64M")
    hog = connect(srv, structured=False)
    try:
        if stall == "stops sending":
            hog.send(header(p.CMD_WRITE, 1, 0, 16 * MiB) + bytes(64 * KiB))
        else:
            hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.send(b"".join(header(p.CMD_READ, i, 0, 8 * MiB) for i in range(8)))
        time.sleep(0.5)  # the hog's requests are in before the victim's
        with connect(srv) as victim:
            victim.sock.settimeout(30)
            assert victim.read(0, MiB) == bytes(MiB)  # once the hog is gone
        assert hog.is_closed(timeout=10)
    finally:
        hog.close()
    assert "no progress" in srv.log_text()


def test_pipelined_reads_are_bounded_per_connection(start_server: StartServer,
                                                    tmp_path: Path) -> None:
    """32 pipelined 32 MiB READs on a file export (served from a thread pool, so all of
    them were in flight at once: 1 GiB) and a client that does not read: the server
    allocates no more than the connection's budget, and every reply then arrives intact."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(b"\xa5" * (64 * MiB))
    srv = start_server("--file", f"disk={image}")
    pid = srv.proc.pid
    count, size = 32, 32 * MiB
    with connect(srv, structured=False) as c:
        base = settle(pid)
        reset_peak(pid)
        c.send(b"".join(header(p.CMD_READ, i, (i % 2) * size, size) for i in range(count)))
        settle(pid)
        grown = peak(pid) - base
        assert grown < 128 * MiB, f"pipelined READs cost {grown >> 20} MiB"
        seen = set()
        for _ in range(count):
            error, cookie, data = read_simple_reply(c, size)
            assert error == 0 and data[:1] == b"\xa5" and data[-1:] == b"\xa5"
            seen.add(cookie)
        assert seen == set(range(count))
        assert peak(pid) - base < 128 * MiB


def test_requests_in_flight_are_bounded_per_connection(start_server: StartServer,
                                                      tmp_path: Path) -> None:
    """Requests without payload cost memory too while in flight (a coroutine, a task, a
    thread pool work item on a file export): 20 clients that pipeline thousands of
    WRITE_ZEROES and read no reply made the server hold them all (63 MiB; 99 MiB once the
    payload budget had come in). Parsing stops at the per-connection limit now."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 64 * MiB)
    srv = start_server("--file", f"disk={image}")
    pid = srv.proc.pid
    clients = [connect(srv, structured=False) for _ in range(20)]
    try:
        base = settle(pid)
        reset_peak(pid)
        burst = b"".join(header(p.CMD_WRITE_ZEROES, i, (i % 1000) * 4096, 4096)
                         for i in range(9000))
        for c in clients:
            c.sock.setblocking(False)  # as much as the socket takes: the server stops reading
            try:
                c.sock.send(burst)
            except BlockingIOError:
                pass
        settle_cpu(pid)
        grown = peak(pid) - base
        assert grown < 32 * MiB, f"pipelined WRITE_ZEROES cost {grown >> 20} MiB"
    finally:
        for c in clients:
            c.close()
    assert srv.alive()


def test_memory_is_given_back_after_a_burst(start_server: StartServer) -> None:
    """After many connections read big blocks at once, the freed buffers go back to the
    system instead of staying in the heap."""
    srv = start_server("--null", "disk=1G")
    pid = srv.proc.pid
    clients = [connect(srv, structured=False) for _ in range(8)]
    try:
        base = settle(pid)
        for c in clients:  # 8 × 4 × 24 MiB: buffers the heap keeps unless trimmed
            c.send(b"".join(header(p.CMD_READ, i, i * 24 * MiB, 24 * MiB) for i in range(4)))
        for c in clients:
            for _ in range(4):
                error, _, _ = read_simple_reply(c, 24 * MiB)
                assert error == 0
        assert wait_for(lambda: rss(pid) - base < 32 * MiB), \
            f"{(rss(pid) - base) >> 20} MiB still held after the burst"
    finally:
        for c in clients:
            c.close()


def test_idle_connections_are_cheap(start_server: StartServer) -> None:
    """The 256 KiB receive buffer waits for transmission: a connection still negotiating
    costs a few KiB (nbdkit: ~9 KiB), not ~260 KiB."""
    srv = start_server("--memory", "disk=1M")
    pid = srv.proc.pid
    warm = [RawClient(srv.socket) for _ in range(20)]
    for c in warm:
        c.greeting()
    base = settle(pid)
    idle = []
    try:
        for _ in range(300):
            c = RawClient(srv.socket)
            c.handshake()
            idle.append(c)
        assert wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) >= 320)
        per_connection = (settle(pid) - base) // 300
        assert per_connection < 32 * KiB, f"{per_connection >> 10} KiB per idle connection"
    finally:
        for c in warm + idle:
            c.close()


def test_block_status_replies_for_a_client_that_never_reads_are_bounded(
        start_server: StartServer) -> None:
    """BLOCK_STATUS replies have no payload to budget by, but can be large (here 8192
    extents, 64 KiB each): 20 connections pipelining 160 of them and reading none made the
    server queue every reply (200 MiB). They are charged to the payload budget too."""
    srv = start_server("--payload-budget", "32M", "--memory", "disk=256M")
    pid = srv.proc.pid
    page = 32 * KiB  # the memory device's allocation unit: every other one has data
    with connect(srv) as c:
        for i in range(0, 4096, 512):
            for j in range(i, i + 512):
                c.send_request(p.CMD_WRITE, j, 2 * j * page, page, payload=b"\x01" * page)
            assert all(r.errno == 0 for r in c.replies(512).values())
        reply = c.request(p.CMD_BLOCK_STATUS, 0, 256 * MiB)
        assert len(reply.chunks[0].payload) == 4 + 8 * 8192
    socks = []
    try:
        for _ in range(20):
            c = connect(srv)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            socks.append(c)
        base = settle(pid)
        reset_peak(pid)
        for c in socks:
            c.send(b"".join(header(p.CMD_BLOCK_STATUS, i, 0, 256 * MiB) for i in range(160)))
        settle_cpu(pid)
        grown = peak(pid) - base
        assert grown < 32 * MiB + 48 * MiB, f"unread BLOCK_STATUS replies cost {grown >> 20} MiB"
    finally:
        for c in socks:
            c.close()
    assert srv.alive()


# -- item 14: requests above 32 MiB ---------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_requests_above_32_mib_are_served(start_server: StartServer, structured: bool) -> None:
    """nbd-tester-client sends up to ~48 MiB through EXPORT_NAME, which never sees the
    advertised maximum; nbd-server and nbdkit serve them, and so does this server."""
    srv = start_server("--memory", "disk=160M")
    data = os.urandom(MiB) * 48
    with RawClient(srv.socket, timeout=60) as c:
        c.handshake()
        if structured:
            c.go("disk", infos=(p.INFO_TYPE_BLOCK_SIZE,))
        else:
            c.send_option(p.OPT_EXPORT_NAME, b"disk")
            c.recv_exact(10)
        assert c.request(p.CMD_WRITE, MiB, len(data), payload=data).errno == 0
        assert c.read(MiB, len(data)) == data
        assert c.read(0, 64 * MiB)[MiB:49 * MiB] == data  # nbdkit's hard maximum
        # Above it: READ is refused, a WRITE is drained and refused, the stream stays usable.
        assert c.request(p.CMD_READ, 0, 64 * MiB + 512).errno == p.NBD_EINVAL
        assert c.request(p.CMD_WRITE, 0, 64 * MiB + 512).errno == p.NBD_EINVAL
        assert c.read(MiB, 4096) == data[:4096]


def test_an_oversized_request_is_served_alone(start_server: StartServer) -> None:
    """A request larger than the whole budget still runs, when nothing else is in flight."""
    srv = start_server("--payload-budget", "16M", "--memory", "disk=64M")
    data = os.urandom(MiB) * 40
    with connect(srv) as c:
        for i in range(4):  # queued behind smaller ones, then alone
            c.send_request(p.CMD_READ, 100 + i, 0, 8 * MiB)
        c.send_request(p.CMD_WRITE, 1, 0, len(data), payload=data)
        c.send_request(p.CMD_READ, 2, 0, len(data))
        replies = c.replies(6)
        assert all(r.errno == 0 for r in replies.values())
        assert read_data(replies[2], 0, len(data)) == data


def test_block_size_advertisement_is_unchanged(start_server: StartServer) -> None:
    srv = start_server("--memory", "disk=1M")
    with RawClient(srv.socket) as c:
        c.handshake()
        replies = c.option(p.OPT_INFO, p.info_request("disk", [p.INFO_TYPE_BLOCK_SIZE]))
        sizes = [r.data for r in replies if r.reply_type == p.REP_INFO
                 and struct.unpack_from(">H", r.data)[0] == p.INFO_TYPE_BLOCK_SIZE]
        assert sizes == [struct.pack(">HIII", p.INFO_TYPE_BLOCK_SIZE, 1, 4096, 32 * MiB)]


# -- the same class of hole in the handshake ------------------------------------------------


def test_a_client_may_send_only_so_many_options(start_server: StartServer) -> None:
    """Each option costs work (INFO opens the export); nbdkit allows 32, plus 32 per export
    after a LIST. The connection is dropped beyond that."""
    srv = start_server("--memory", "disk=1M")
    with RawClient(srv.socket) as c:
        c.handshake()
        for _ in range(32):
            assert c.option(p.OPT_INFO, p.info_request("disk", []))[-1].reply_type == p.REP_ACK
        c.send_unless_closed(struct.pack(">QII", p.IHAVEOPT, p.OPT_INFO, 6)
                             + p.info_request("disk", []))
        assert c.is_closed()
    with RawClient(srv.socket) as c:  # a LIST allows 32 more per export
        c.handshake()
        assert c.option(p.OPT_LIST)[-1].reply_type == p.REP_ACK
        for _ in range(60):  # and GO with its two options
            assert c.option(p.OPT_INFO, p.info_request("disk", []))[-1].reply_type == p.REP_ACK
        c.go("disk")
        assert c.read(0, 512) == bytes(512)
    assert srv.alive()


def test_options_pipelined_by_a_client_that_never_reads_are_bounded(
        start_server: StartServer) -> None:
    """LIST replies for a client that never reads them: the server must stop, not queue."""
    srv = start_server(*[arg for i in range(200) for arg in ("--memory", f"e{i:03}=1M")])
    pid = srv.proc.pid
    base = settle(pid)
    reset_peak(pid)
    socks = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(srv.socket)
            s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE)
                      + struct.pack(">QII", p.IHAVEOPT, p.OPT_LIST, 0) * 4000)
            socks.append(s)
        settle(pid)
        grown = peak(pid) - base
        assert grown < 64 * MiB, f"unread LIST replies cost {grown >> 20} MiB"
    finally:
        for s in socks:
            s.close()
    assert srv.alive()
