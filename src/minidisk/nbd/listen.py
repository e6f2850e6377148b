"""Where a server listens: unix://, tcp://, stdin/stdout, or a systemd-activated socket;
the listeners themselves, and who is at the other end of an accepted connection.

URL forms follow rump_sp(7) (and DESIGN.md): ``unix://relative/path``,
``unix:///absolute/path``, ``tcp://ip:port/`` (``tcp://0:3755/`` means every address).
``-`` serves exactly one connection on stdin/stdout (like ``nbdkit -s``). When started with
systemd socket activation (LISTEN_PID = our pid, LISTEN_FDS >= 1, as nbdinfo/nbdcopy's
``[ CMD ]`` syntax does), the inherited fd 3 is used and the URL may be omitted.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minidisk.nbd.exports import Identity
from minidisk.nbd.transport import Transport
from minidisk.unixsocket import remove_stale_socket

if TYPE_CHECKING:
    from minidisk.nbd.connection import Connection

SD_LISTEN_FDS_START = 3
KEEPALIVE_PROBES = 4
_PEERCRED = struct.Struct("3i")


class URLError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ListenAddress:
    kind: Transport
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind is Transport.UNIX:
            return f"unix://{self.path}"
        if self.kind is Transport.TCP:
            return f"tcp://{self.host}:{self.port}/"
        return str(self.kind)


def parse_url(url: str) -> ListenAddress:
    if url == "-":
        return ListenAddress(Transport.STDIO)
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        if not path:
            raise URLError(f"{url!r}: unix URL without a path")
        return ListenAddress(Transport.UNIX, path=path)
    if url.startswith("tcp://"):
        rest = url[len("tcp://"):].rstrip("/")
        host, sep, port_text = rest.rpartition(":")
        if not sep or not port_text.isdigit() or not host:
            raise URLError(f"{url!r}: expected tcp://ip:port/")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise URLError(f"{url!r}: port {port} out of range")
        if host == "0":
            host = "0.0.0.0"
        return ListenAddress(Transport.TCP, host=host.strip("[]"), port=port)
    raise URLError(f"{url!r}: expected unix://PATH, tcp://IP:PORT/ or -")


def socket_activation() -> list[socket.socket]:
    """Sockets passed by systemd-style activation, or [] (and the variables are cleared)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count < 1:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def bind(address: ListenAddress, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Create the listening socket (so errors such as 'address in use' surface early)."""
    if address.kind is Transport.UNIX:
        path = address.path
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on unix://{path}: {e.strerror}") from None
    elif address.kind is Transport.TCP:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on {address}: {e.strerror}") from None
    else:
        raise ValueError(f"cannot bind {address.kind}")
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def drop_dead_peers(sock: socket.socket, timeout: int) -> None:
    """Make the kernel close an accepted TCP connection whose peer stops answering (its host
    vanished, the network was cut) after about `timeout` seconds, idle or not.

    Keepalive probes start after half of it idle and come every eighth; TCP_USER_TIMEOUT
    ends the connection once data or probes have gone unacknowledged for `timeout` (with
    both set the kernel gives up on the first unanswered probe past it). TLS runs over
    this same socket, so it is covered too.
    """
    idle = max(1, timeout // 2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, timeout // 8))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout * 1000)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files to `wanted` if the hard limit allows (a server
    that may hold `max_connections` sockets); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def peer_identity(sock: socket.socket | None, transport: Transport) -> Identity:
    """Who is at the other end of an accepted connection, as far as the socket proves it:
    SO_PEERCRED's pid, uid and gid on a unix socket, the address on TCP."""
    if sock is None:
        return Identity(transport)
    if sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(raw)
        except OSError:
            return Identity(transport)
        return Identity(transport, address=str(sock.getsockname()), uid=uid, gid=gid, pid=pid)
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return Identity(transport)
    return Identity(transport, address=f"{host}:{port}")


class Listeners:
    """Every socket one server accepts connections on, and its one stdin/stdout connection.

    `factory(transport)` makes the connection for a socket accepted over `transport` (an
    inherited socket is UNIX or TCP, as its family says); the backlog is as long as the
    server's connection limit (asyncio's default of 100 refused bursts with EAGAIN).
    """

    def __init__(self, factory: Callable[[Transport], Connection], backlog: int) -> None:
        self.factory = factory
        self.backlog = backlog
        self.servers: list[asyncio.base_events.Server] = []
        self.unix_paths: list[str] = []  # removed again by close()
        self.stdio_closed: asyncio.Event | None = None  # set when the stdio connection ends

    async def start(self, urls: list[str]) -> None:
        """Listen on the sockets systemd passed us, or else on every URL."""
        inherited = socket_activation()
        for sock in inherited:
            await self.listen_socket(sock)
        if not inherited:
            for url in urls:
                await self.listen(parse_url(url))

    async def listen(self, address: ListenAddress) -> None:
        loop = asyncio.get_running_loop()
        if address.kind is Transport.STDIO:
            sock = socket.socket(fileno=os.dup(0))
            _, conn = await loop.connect_accepted_socket(
                lambda: self.factory(Transport.STDIO), sock)
            self.stdio_closed = conn.closed
            return
        sock = bind(address, self.backlog)
        await self.listen_socket(sock)
        if address.kind is Transport.UNIX:
            self.unix_paths.append(address.path)

    async def listen_socket(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: self.factory(Transport.UNIX),
                                                sock=sock, backlog=self.backlog)
        else:
            srv = await loop.create_server(lambda: self.factory(Transport.TCP), sock=sock,
                                           backlog=self.backlog)
        self.servers.append(srv)

    def addresses(self) -> list[str | tuple[str, int]]:
        """Where each listening socket is bound: a unix path or a TCP (host, port), as the
        kernel reports it (so a port 0 in the URL shows as the port it chose)."""
        found: list[str | tuple[str, int]] = []
        for srv in self.servers:
            for sock in srv.sockets:
                name = sock.getsockname()
                found.append(name if isinstance(name, str) else (name[0], name[1]))
        return found

    def stop(self) -> None:
        """Accept no more connections (those accepted go on)."""
        for srv in self.servers:
            srv.close()

    def remove_paths(self) -> None:
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
