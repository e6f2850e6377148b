"""The client half of the NBD fixed-newstyle handshake, for handing a socket to kernel nbd.

The kernel's nbd driver speaks only the transmission phase with simple replies, so we connect,
negotiate NBD_OPT_GO ourselves (no structured replies, no TLS) and give it the socket.
Falls back to NBD_OPT_EXPORT_NAME for servers that answer GO with ERR_UNSUP.
"""

from __future__ import annotations

import socket
import struct
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
    REP_ACK,
    REP_ERR_UNSUP,
    REP_INFO,
    REPLY_MAGIC,
    TFLAG_CAN_MULTI_CONN,
    TFLAG_READ_ONLY,
    info_request,
)
from minidisk.nbd.protocol import INFO_BLOCK_SIZE as INFO_BLOCK_SIZE_DATA
from minidisk.nbd.protocol import INFO_EXPORT as INFO_EXPORT_DATA
from minidisk.nbd.protocol import INFO_TYPE_BLOCK_SIZE as INFO_BLOCK_SIZE
from minidisk.nbd.protocol import INFO_TYPE_EXPORT as INFO_EXPORT
from minidisk.nbd.protocol import OPTION_HEADER as OPTION
from minidisk.nbd.protocol import REP_FLAG_ERROR as REP_ERR_BIT

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
        negotiated = _negotiate(sock, uri.export)
    except OSError as e:
        sock.close()
        raise AttachError(f"handshake with {uri} failed: {e.strerror or e}") from None
    except AttachError as e:
        sock.close()
        raise AttachError(f"{uri}: {e}") from None
    sock.settimeout(None)  # the kernel expects a blocking socket
    return negotiated


def _negotiate(sock: socket.socket, export: str) -> Negotiated:
    magic, opt_magic, server_flags = GREETING.unpack(_recv(sock, GREETING.size))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise AttachError("not an NBD server speaking the newstyle protocol")
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise AttachError("server does not speak fixed newstyle")
    no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
    sock.sendall(CLIENT_FLAGS.pack(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if no_zeroes else 0)))

    name = export.encode()
    data = info_request(export, [INFO_BLOCK_SIZE])
    sock.sendall(OPTION.pack(IHAVEOPT, OPT_GO, len(data)) + data)
    size, flags, minimum = -1, 0, 512
    while True:
        magic, option, reply, length = OPTION_REPLY.unpack(_recv(sock, OPTION_REPLY.size))
        payload = _recv(sock, length)
        if magic != REPLY_MAGIC or option != OPT_GO:
            raise AttachError("server sent a malformed option reply")
        if reply == REP_ACK:
            break
        if reply == REP_ERR_UNSUP:
            return _export_name(sock, name, no_zeroes)
        if reply & REP_ERR_BIT:
            why = _ERRORS.get(reply & ~REP_ERR_BIT, f"error {reply & ~REP_ERR_BIT}")
            text = payload.decode(errors="replace")
            raise AttachError(f"export {export!r} refused: {why}" + (f" ({text})" if text else ""))
        if reply == REP_INFO and len(payload) >= 2:
            (info,) = struct.unpack_from(">H", payload)
            if info == INFO_EXPORT and len(payload) == INFO_EXPORT_DATA.size:
                _, size, flags = INFO_EXPORT_DATA.unpack(payload)
            elif info == INFO_BLOCK_SIZE and len(payload) == INFO_BLOCK_SIZE_DATA.size:
                _, minimum, _, _ = INFO_BLOCK_SIZE_DATA.unpack(payload)
    if size < 0:
        raise AttachError("server acknowledged GO without sending the export size")
    return Negotiated(sock, size, flags, _kernel_block_size(minimum))


def _export_name(sock: socket.socket, name: bytes, no_zeroes: bool) -> Negotiated:
    sock.sendall(OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
    size, flags = EXPORT_NAME_REPLY.unpack(_recv(sock, EXPORT_NAME_REPLY.size))
    if not no_zeroes:
        _recv(sock, 124)
    return Negotiated(sock, size, flags, 512)


def _kernel_block_size(minimum: int) -> int:
    # The kernel's logical block size is the smallest request it makes: the export's minimum
    # (as nbd-client's 512 by default), a power of two between 512 and the page size. The
    # preferred size would refuse 512-byte O_DIRECT on exports that take any size.
    size = 512
    while size < min(minimum, 4096):
        size *= 2
    return size


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        chunk = sock.recv_into(view[got:])
        if chunk == 0:
            raise AttachError("server closed the connection during the handshake")
        got += chunk
    return bytes(buf)
