"""Where a server listens: unix://, tcp://, stdin/stdout, or a systemd-activated socket.

URL forms follow rump_sp(7) (and DESIGN.md): ``unix://relative/path``,
``unix:///absolute/path``, ``tcp://ip:port/`` (``tcp://0:3755/`` means every address).
``-`` serves exactly one connection on stdin/stdout (like ``nbdkit -s``). When started with
systemd socket activation (LISTEN_PID = our pid, LISTEN_FDS >= 1, as nbdinfo/nbdcopy's
``[ CMD ]`` syntax does), the inherited fd 3 is used and the URL may be omitted.
"""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import dataclass

from minidisk.unixsocket import remove_stale_socket

SD_LISTEN_FDS_START = 3
KEEPALIVE_PROBES = 4


class URLError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ListenAddress:
    kind: str  # "unix", "tcp", "stdio", "inherited"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        if self.kind == "tcp":
            return f"tcp://{self.host}:{self.port}/"
        return self.kind


def parse_url(url: str) -> ListenAddress:
    if url == "-":
        return ListenAddress("stdio")
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        if not path:
            raise URLError(f"{url!r}: unix URL without a path")
        return ListenAddress("unix", path=path)
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
        return ListenAddress("tcp", host=host.strip("[]"), port=port)
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
    if address.kind == "unix":
        path = address.path
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on unix://{path}: {e.strerror}") from None
    elif address.kind == "tcp":
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


