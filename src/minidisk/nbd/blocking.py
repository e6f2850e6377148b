"""Clients over blocking sockets (kernel attach, the control client): connecting, and a
client negotiation driven over the socket.

Every read of one `negotiate` call counts against one deadline, so that a server sending a
byte now and then cannot hold the caller longer than its timeout; reads are exactly what
the negotiation wants, so the socket holds nothing of ours when it is handed on (to the
kernel, or to TLS).
"""

from __future__ import annotations

import errno
import socket
import time

from minidisk.nbd.client_negotiation import ClientNegotiation, Event
from minidisk.nbd.transport import Transport


def open_socket(transport: Transport, path: str, host: str, port: int,
                timeout: float) -> socket.socket:
    """A blocking stream socket connected to a unix `path` or a TCP `host`:`port` (with
    TCP_NODELAY: options and requests are small); OSError as connect raises it."""
    if transport is Transport.UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def negotiate(neg: ClientNegotiation, sock: socket.socket, deadline: float | None) -> Event:
    """Send and receive until `neg` has an event; TimeoutError past `deadline` (monotonic),
    ConnectionResetError when the server hangs up, ReplyError when it breaks the protocol.
    The socket's timeout is left as it was."""
    timeout = sock.gettimeout()
    try:
        while True:
            event = neg.next_event()
            out = neg.data_to_send()
            if out:
                sock.sendall(out)
            if event is not None:
                return event
            neg.receive_data(_recv_exactly(sock, neg.wanted, deadline))
    finally:
        sock.settimeout(timeout)


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)  # n was checked by the negotiation before it asked for it
    view, got = memoryview(buf), 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(left)
        chunk = sock.recv_into(view[got:])
        if chunk == 0:
            raise ConnectionResetError(errno.ECONNRESET, "server closed the connection")
        got += chunk
    return buf
