"""A hostile NBD server for client tests: it negotiates like a real one (or misbehaves in the
handshake, when told to), then answers each request as its `reply` function says.

It runs in threads over a unix socket, so both in-process asyncio clients and subprocesses
(`minidisk serve --nbd`, `minidisk attach`) can be pointed at it. Messages are built from
the spec's layouts by hand, not from minidisk's decoders.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minidisk.nbd import protocol as p

SIZE = 1 << 20
CONTEXT_ID = 7  # the id the server gives base:allocation


@dataclass(frozen=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


# What the server sends for one request: bytes, or None to send nothing (a stall).
Replier = Callable[[Request], bytes | None]
# What the server sends in place of the reply to one option, or None to negotiate properly.
OptionMangler = Callable[[int, bytes], bytes | None]


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", 0x3E889045565A9, option, reply, len(data)) + data


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, cookie) + data


def chunk(cookie: int, chunk_type: int, payload: bytes, done: bool = True, flags: int = 0,
          length: int | None = None) -> bytes:
    declared = len(payload) if length is None else length
    return struct.pack(">IHHQI", 0x668E33EF, flags | (1 if done else 0), chunk_type, cookie,
                       declared) + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = True) -> bytes:
    return chunk(cookie, 1, struct.pack(">Q", offset) + data, done)


def good(request: Request) -> bytes:
    """What a correct server sends: zeroes for READ, one extent for BLOCK_STATUS."""
    if request.cmd == p.CMD_READ:
        return data_chunk(request.cookie, request.offset, bytes(request.length))
    if request.cmd == p.CMD_BLOCK_STATUS:
        return chunk(request.cookie, 5, struct.pack(">III", CONTEXT_ID, request.length, 0))
    return simple(request.cookie)


class HostileServer:
    def __init__(self, path: Path, reply: Replier = good,
                 option: OptionMangler | None = None, greet: bool = True) -> None:
        self.path = str(path)
        self.reply = reply
        self.option = option
        self.greet = greet
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.connections: list[socket.socket] = []
        self.requests: list[Request] = []
        self.hung_up = threading.Event()  # a client closed its connection
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.greet and self._negotiate(conn):
                self._transmit(conn)
            else:
                self.stopped.wait()  # say nothing, hold the connection
        except OSError:
            self.hung_up.set()

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = conn.recv(n - len(buf))
            if not got:
                raise ConnectionResetError("client went away")
            buf += got
        return buf

    def _negotiate(self, conn: socket.socket) -> bool:
        conn.sendall(struct.pack(">QQH", p.NBDMAGIC, p.IHAVEOPT, 3))
        self._recv(conn, 4)
        while True:
            _, option, length = struct.unpack(">QII", self._recv(conn, 16))
            data = self._recv(conn, length)
            mangled = self.option(option, data) if self.option is not None else None
            if mangled is not None:
                conn.sendall(mangled)
                if option == p.OPT_GO:
                    self.stopped.wait()
                    return False
                continue
            if option == p.OPT_STRUCTURED_REPLY:
                conn.sendall(option_reply(option, p.REP_ACK))
            elif option == p.OPT_SET_META_CONTEXT:
                name = b"base:allocation"
                conn.sendall(option_reply(option, p.REP_META_CONTEXT,
                                          struct.pack(">I", CONTEXT_ID) + name)
                             + option_reply(option, p.REP_ACK))
            elif option == p.OPT_GO:
                flags = (p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA
                         | p.TFLAG_SEND_TRIM | p.TFLAG_SEND_WRITE_ZEROES)
                conn.sendall(option_reply(option, p.REP_INFO, struct.pack(">HQH", 0, SIZE, flags))
                             + option_reply(option, p.REP_ACK))
                return True
            else:
                conn.sendall(option_reply(option, p.REP_ERR_UNSUP))

    def _transmit(self, conn: socket.socket) -> None:
        while True:
            _, flags, cmd, cookie, offset, length = struct.unpack(
                ">IHHQQI", self._recv(conn, 28))
            if cmd == p.CMD_WRITE:
                self._recv(conn, length)
            if cmd == p.CMD_DISC:
                continue  # the client hangs up next
            request = Request(flags, cmd, cookie, offset, length)
            self.requests.append(request)
            out = self.reply(request)
            if out is not None:
                conn.sendall(out)
