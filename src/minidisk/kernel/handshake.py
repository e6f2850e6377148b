"""The client half of the NBD fixed-newstyle handshake, for handing a socket to kernel nbd.

The kernel's nbd driver speaks only the transmission phase with simple replies, so we connect,
negotiate NBD_OPT_GO ourselves (no structured replies, no TLS) and give it the socket.
Falls back to NBD_OPT_EXPORT_NAME for servers that answer GO with ERR_UNSUP.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from minidisk.kernel.errors import AttachError
from minidisk.kernel.uri import NbdUri

# The wire format is the one pure module the server and every client share.
from minidisk.nbd.protocol import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPTION_REPLY,
    REP_ERR_UNSUP,
    TFLAG_CAN_MULTI_CONN,
    TFLAG_READ_ONLY,
    info_request,
)
from minidisk.nbd.protocol import INFO_TYPE_BLOCK_SIZE as INFO_BLOCK_SIZE
from minidisk.nbd.protocol import OPTION_HEADER as OPTION
from minidisk.nbd.protocol import REP_FLAG_ERROR as REP_ERR_BIT
from minidisk.nbd.replies import OptionReplies, ReplyError, export_info

_ERRORS = {1: "option unsupported", 2: "denied by policy", 3: "invalid option", 4: "platform",
           5: "TLS required", 6: "no such export", 7: "shutting down", 8: "block size",
           9: "too big"}

@dataclass
class Negotiated:
    sock: socket.socket
    size: int
    flags: int  # transmission flags
    block_size: int  # the server's minimum block size, clamped for the kernel

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & TFLAG_CAN_MULTI_CONN)


def connect(uri: NbdUri, timeout: float = 30.0) -> Negotiated:
    """Open a socket to `uri`'s server and negotiate its export; errors are AttachError."""
    if uri.tls:
        raise AttachError(f"{uri}: kernel nbd cannot use TLS; attach with --method nbdfuse")
    try:
        if uri.transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(uri.socket)
        elif uri.transport == "tcp":
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            raise AttachError(f"{uri}: kernel nbd attach supports tcp and unix sockets only")
    except OSError as e:
        raise AttachError(f"cannot connect to {uri}: {e.strerror or e}") from None
    try:
        negotiated = _negotiate(_Peer(sock, time.monotonic() + timeout), uri.export)
    except OSError as e:
        sock.close()
        raise AttachError(f"handshake with {uri} failed: {e.strerror or e}") from None
    except AttachError as e:
        sock.close()
        raise AttachError(f"{uri}: {e}") from None
    sock.settimeout(None)  # the kernel expects a blocking socket
    return negotiated


def _negotiate(peer: _Peer, export: str) -> Negotiated:
    sock, _recv = peer.sock, peer.recv
    magic, opt_magic, server_flags = GREETING.unpack(_recv(GREETING.size))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise AttachError("not an NBD server speaking the newstyle protocol")
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise AttachError("server does not speak fixed newstyle")
    no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
    sock.sendall(CLIENT_FLAGS.pack(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if no_zeroes else 0)))

    data = info_request(export, [INFO_BLOCK_SIZE])
    sock.sendall(OPTION.pack(IHAVEOPT, OPT_GO, len(data)) + data)
    # Each reply's length is checked before it is read, and so is their number.
    replies = OptionReplies(OPT_GO)
    try:
        while not replies.add(_recv(replies.data_length(_recv(OPTION_REPLY.size)))):
            pass
        reply, payload = replies.final
        if reply == REP_ERR_UNSUP:
            return _export_name(peer, export.encode(), no_zeroes)
        if replies.refused:
            why = _ERRORS.get(reply & ~REP_ERR_BIT, f"error {reply & ~REP_ERR_BIT}")
            text = payload.decode(errors="replace")
            raise AttachError(f"export {export!r} refused: {why}" + (f" ({text})" if text else ""))
        info = export_info(replies.replies)
    except ReplyError as e:
        raise AttachError(f"server broke the handshake: {e}") from None
    minimum = info.block_size[0] if info.block_size is not None else 512
    return Negotiated(sock, info.size, info.tflags, _kernel_block_size(minimum))


def _export_name(peer: _Peer, name: bytes, no_zeroes: bool) -> Negotiated:
    peer.sock.sendall(OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
    size, flags = EXPORT_NAME_REPLY.unpack(peer.recv(EXPORT_NAME_REPLY.size))
    if not no_zeroes:
        peer.recv(124)
    return Negotiated(peer.sock, size, flags, 512)


def _kernel_block_size(minimum: int) -> int:
    # The kernel's logical block size is the smallest request it makes: the export's minimum
    # (as nbd-client's 512 by default), a power of two between 512 and the page size. The
    # preferred size would refuse 512-byte O_DIRECT on exports that take any size.
    size = 512
    while size < min(minimum, 4096):
        size *= 2
    return size


@dataclass
class _Peer:
    """The server during the handshake: every read counts against one deadline, so that a
    server sending a byte now and then cannot hold the attach for longer than the timeout."""

    sock: socket.socket
    deadline: float

    def recv(self, n: int) -> bytes:
        """n bytes; callers check a declared length before asking for it."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv_into(view[got:])
            if chunk == 0:
                raise AttachError("server closed the connection during the handshake")
            got += chunk
        return bytes(buf)
