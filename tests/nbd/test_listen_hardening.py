"""The listening side under attack: what `serve unix://PATH` may remove, how many clients it
takes and for how long, and how it notices a peer whose host vanished (issue 10, items 5,
6 and 8).

Servers run as `minidisk serve -s` subprocesses (tests/nbd/conftest.py); where a real
client matters, libnbd runs under /usr/bin/python3.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.harness import MINIDISK, stop_process
from tests.nbd.conftest import StartServer
from tests.nbd.nbd_helpers import Closed, RawClient, run_libnbd
from tests.nbd.test_tls import client_context, make_certificates, starttls

from minidisk import control_client
from minidisk.daemon.config import DaemonConfig
from minidisk.nbd import protocol as p
from minidisk.nbd.listen import ListenAddress, bind
from minidisk.nbd.transport import Transport

pytestmark = pytest.mark.timeout(180)

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

MINIDISK_TIMEOUT = 15.0


# -- item 6: only a socket nobody listens on is stale ---------------------------------------


def _serve_once(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MINIDISK, "serve", "-s", "--memory", "disk=1M", url],
                          capture_output=True, text=True, timeout=MINIDISK_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_serve_refuses_to_replace_a_regular_file(short_tmp: Path) -> None:
    victim = short_tmp / "precious"
    victim.write_bytes(b"keep me")
    proc = _serve_once(f"unix://{victim}")
    assert proc.returncode == 1
    assert str(victim) in proc.stderr and "not a socket" in proc.stderr, proc.stderr
    assert victim.read_bytes() == b"keep me"


def test_bind_does_not_follow_or_remove_a_symlink(short_tmp: Path) -> None:
    # A symlink to a socket nobody listens on: connect() would follow it and find the
    # target stale; the link must still not be taken for a socket (lstat).
    target = short_tmp / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(target))
    dead.close()
    link = short_tmp / "link.sock"
    link.symlink_to(target)
    with pytest.raises(OSError, match="not a socket") as info:
        bind(ListenAddress(Transport.UNIX, path=str(link)))
    assert str(link) in str(info.value)
    assert link.is_symlink() and target.exists()


def test_bind_refuses_a_live_socket(short_tmp: Path) -> None:
    path = short_tmp / "live.sock"
    live = bind(ListenAddress(Transport.UNIX, path=str(path)))
    try:
        with pytest.raises(OSError, match="in use") as info:
            bind(ListenAddress(Transport.UNIX, path=str(path)))
        assert str(path) in str(info.value)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # still the first listener's
        probe.close()
    finally:
        live.close()


def test_bind_replaces_a_stale_socket(short_tmp: Path) -> None:
    path = short_tmp / "stale.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # the name stays, nobody listens: what a crash leaves behind
    sock = bind(ListenAddress(Transport.UNIX, path=str(path)))
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
    finally:
        sock.close()
        os.unlink(path)


# -- item 8: how many clients, and for how long before they negotiate ------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fds(pid: int) -> int:
    """The server's descriptor count once it stays the same for half a second (bounded)."""
    count, deadline = _fds(pid), time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _fds(pid)
        if now == count:
            break
        count = now
    return count


def _wait_for(predicate: Callable[[], bool], deadline_s: float = 20.0) -> bool:
    """Poll `predicate` until it holds or the deadline passes (a bound, not a timing)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_300_simultaneous_libnbd_connects_all_succeed(start_server: StartServer) -> None:
    # asyncio's default backlog of 100 made 118-168 of these fail with EAGAIN.
    srv = start_server("--memory", "disk=1M")
    result = run_libnbd("""
        handles, failed = [], 0
        for _ in range(params["n"]):
            h = nbd.NBD()
            try:
                h.aio_connect_unix(params["socket"])
                handles.append(h)
            except nbd.Error:
                failed += 1
        for h in handles:
            try:
                while h.aio_is_connecting():
                    h.poll(-1)
                if not h.aio_is_ready():
                    failed += 1
            except nbd.Error:
                failed += 1
        result = {"failed": failed, "connected": len(handles)}
    """, timeout=120, n=300, socket=srv.socket)
    assert result == {"failed": 0, "connected": 300}, result
    assert srv.alive()


def test_connections_over_the_limit_are_closed_before_the_greeting(
        start_server: StartServer) -> None:
    srv = start_server("--max-connections", "4", "--memory", "disk=1M")
    held = [RawClient(srv.socket) for _ in range(4)]
    try:
        for c in held:
            c.greeting()
        with RawClient(srv.socket) as extra:  # accepted, then closed without a word
            with pytest.raises(Closed):
                extra.greeting()
        held.pop().close()
        deadline = time.monotonic() + 20
        while True:  # the freed slot is usable again
            with RawClient(srv.socket) as again:
                try:
                    again.handshake()
                except Closed:
                    assert time.monotonic() < deadline, "the closed slot never came back"
                    time.sleep(0.05)
                    continue
                again.go("disk")
                assert again.read(0, 512) == bytes(512)
                break
    finally:
        for c in held:
            c.close()
    assert srv.alive() and "connection limit" in srv.log_text()


def test_silent_and_slow_handshakes_are_dropped_and_their_slots_freed(
        start_server: StartServer) -> None:
    srv = start_server("--handshake-timeout", "1", "--max-connections", "8",
                       "--memory", "disk=1M")
    pid = srv.proc.pid
    # The baseline once the server has served a client and let it go: on a loaded machine a
    # count taken right after start-up can miss descriptors the server is still opening.
    with RawClient(srv.socket) as warm:
        warm.handshake()
        warm.go("disk")
    before = _settled_fds(pid)
    silent = [RawClient(srv.socket) for _ in range(8)]  # every slot taken
    slow = silent.pop()
    slow.handshake()
    try:
        for c in silent:
            c.greeting()
        # A slowloris: an option header, then one byte of its data now and then.
        slow.send(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 64))
        for _ in range(100):
            try:
                slow.send(b"\0")
            except Closed:
                break
            time.sleep(0.1)
        for c in silent + [slow]:
            assert c.is_closed(timeout=20), "a client that never negotiated kept its slot"
    finally:
        for c in silent + [slow]:
            c.close()
    assert _wait_for(lambda: _fds(pid) <= before), (before, _fds(pid))
    with RawClient(srv.socket) as fresh:  # the slots are free again
        fresh.handshake()
        fresh.go("disk")
        time.sleep(1.5)  # past the handshake deadline: transmission is not bound by it
        assert fresh.read(0, 512) == bytes(512)


def test_a_control_session_outlives_the_handshake_deadline(start_server: StartServer) -> None:
    # Link keepers hold their control connection for the whole link: once a permitted
    # control command ran, the connection is no longer a pending handshake.
    srv = start_server("--handshake-timeout", "1", "--memory", "disk=1M")
    with control_client.ControlConnection(srv.url) as session:
        assert "disk" in str(session.call("exports"))
        time.sleep(1.5)
        assert "disk" in str(session.call("exports"))


def test_connection_limits_from_toml(tmp_path: Path) -> None:
    config_file = tmp_path / "server.toml"
    config_file.write_text('url = "unix:///tmp/x.sock"\nmax_connections = 16\n'
                           'handshake_timeout = 5\npeer_timeout = 30\n')
    config = DaemonConfig.load({}, str(config_file))
    assert (config.max_connections, config.handshake_timeout, config.peer_timeout) == (16, 5, 30)
    config = DaemonConfig.load({"url": ("unix:///tmp/x.sock",)})
    assert config.max_connections == 1024 and config.handshake_timeout == 10
    config_file.write_text('url = "unix:///tmp/x.sock"\nmax_connections = 0\n')
    with pytest.raises(ValueError, match="max_connections"):
        DaemonConfig.load({}, str(config_file))


# -- item 5 (server side): a TCP peer whose host vanishes is dropped ------------------------


class TCPClient(RawClient):
    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout)
        self.structured = False
        self.pending: dict[int, tuple[int, int]] = {}


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _server_side(pid: int, client: socket.socket) -> socket.socket:
    """The server's own end of `client`'s connection: a duplicate of its descriptor taken
    with pidfd_getfd(2), so that its socket options are read from the server itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    wanted = client.getsockname()
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            sock = socket.socket(fileno=fd)
            try:
                if sock.type == socket.SOCK_STREAM and sock.getpeername() == wanted:
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"no server socket connected to {wanted}")


def _dead_peer_options(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


@pytest.mark.parametrize("configured, expected", [
    ((), (1, 60, 15, 4, 120_000)),  # the default: gone after about two minutes
    (("--peer-timeout", "40"), (1, 20, 5, 4, 40_000)),
])
def test_accepted_tcp_sockets_keepalive_and_user_timeout(
        start_server: StartServer, configured: tuple[str, ...],
        expected: tuple[int, ...]) -> None:
    port = _free_port()
    srv = start_server(*configured, "--memory", "disk=1M", f"tcp://127.0.0.1:{port}/")
    with TCPClient(("127.0.0.1", port)) as c:
        c.handshake()  # still negotiating: the options are set at accept
        with _server_side(srv.proc.pid, c.sock) as theirs:
            assert _dead_peer_options(theirs) == expected
        c.go("disk")
        assert c.read(0, 512) == bytes(512)


def test_tls_connections_keep_the_keepalive(start_server: StartServer,
                                            tmp_path: Path) -> None:
    make_certificates(tmp_path)
    port = _free_port()
    srv = start_server("--tls=require", "--tls-certificates", str(tmp_path),
                       "--peer-timeout", "30", "--memory", "disk=1M", f"tcp://127.0.0.1:{port}/")
    with TCPClient(("127.0.0.1", port)) as c:
        c.handshake()
        starttls(c, client_context(tmp_path))
        c.go("disk")
        assert c.read(0, 512) == bytes(512)
        with _server_side(srv.proc.pid, c.sock) as theirs:
            assert _dead_peer_options(theirs) == (1, 15, 3, 4, 30_000)


def test_peer_timeout_zero_leaves_keepalive_off(start_server: StartServer) -> None:
    port = _free_port()
    srv = start_server("--peer-timeout", "0", "--memory", "disk=1M", f"tcp://127.0.0.1:{port}/")
    with TCPClient(("127.0.0.1", port)) as c:
        c.handshake()
        with _server_side(srv.proc.pid, c.sock) as theirs:
            assert _dead_peer_options(theirs)[0] == 0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def vanishing_peer() -> Iterator[tuple[str, str, str]]:
    """(namespace, server address, client address): a network namespace joined to ours by a
    veth pair, whose link the test can cut."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = f"{os.getpid() % 10000}"
    ns, ours, theirs = f"mdk-{tag}", f"mdka{tag}", f"mdkb{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    server_ip, client_ip = f"{subnet}.1", f"{subnet}.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        _ip("link", "set", theirs, "netns", ns)
        _ip("addr", "add", f"{server_ip}/30", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", ns, "addr", "add", f"{client_ip}/30", "dev", theirs)
        _ip("-n", ns, "link", "set", theirs, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, server_ip, theirs
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


_PEER = """
import socket, struct, sys, time
from minidisk.nbd import protocol as p
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 10)
def exact(n):
    b = b""
    while len(b) < n:
        b += s.recv(n - len(b))
    return b
exact(18)
s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
name = b"disk"
s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_EXPORT_NAME, len(name)) + name)
exact(10)
print("ready", flush=True)
time.sleep(3600)
"""


def _established_with(pid: int, address: str) -> bool:
    """True while the server process has a TCP connection to `address` (from /proc)."""
    a, b, c, d = (int(x) for x in address.split("."))
    hex_ip = f"{d:02X}{c:02X}{b:02X}{a:02X}"
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(row[2].startswith(hex_ip + ":") and row[3] == "01" for row in rows)


@pytest.mark.timeout(120)
def test_a_peer_whose_network_vanishes_is_dropped(
        start_server: StartServer, vanishing_peer: tuple[str, str, str]) -> None:
    ns, server_ip, their_link = vanishing_peer
    port = _free_port(server_ip)
    srv = start_server("--peer-timeout", "4", "--memory", "disk=1M",
                       f"tcp://{server_ip}:{port}/")
    pid = srv.proc.pid
    before = _fds(pid)
    peer = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _PEER,
                             server_ip, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
        client_ip = server_ip.rsplit(".", 1)[0] + ".2"
        assert _established_with(pid, client_ip) and _fds(pid) == before + 1
        _ip("-n", ns, "link", "set", their_link, "down")  # the peer's host is gone
        assert _wait_for(lambda: not _established_with(pid, client_ip), 60), \
            "the server still holds a connection to a vanished peer"
        assert _wait_for(lambda: _fds(pid) == before, 20), (before, _fds(pid))
    finally:
        stop_process(peer)
    assert srv.alive()
