"""The client half of the NBD handshake, for handing a socket to kernel nbd.

The kernel's nbd driver speaks only the transmission phase with simple replies, so we connect,
negotiate NBD_OPT_GO ourselves (no structured replies, no TLS; nbd/client_negotiation.py over
a blocking socket) and give it the socket. Falls back to NBD_OPT_EXPORT_NAME for servers that
answer GO with ERR_UNSUP.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from minidisk.kernel.errors import AttachError
from minidisk.nbd import client_negotiation as cn
from minidisk.nbd.blocking import negotiate, open_socket
from minidisk.nbd.protocol import TFLAG_CAN_MULTI_CONN, TFLAG_READ_ONLY
from minidisk.nbd.replies import ReplyError
from minidisk.nbd.transport import Transport
from minidisk.nbd.uri import NBDURI


@dataclass
class KernelSocket:
    """A socket negotiated for kernel nbd, and what the kernel is to be told about it."""

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


def connect(uri: NBDURI, timeout: float = 30.0) -> KernelSocket:
    """Open a socket to `uri`'s server and negotiate its export; errors are AttachError.
    The whole handshake is bounded by `timeout`, or by the URI's ?timeout= if it has one."""
    if uri.tls:
        raise AttachError(f"{uri}: kernel nbd cannot use TLS; attach with --method nbdfuse")
    if uri.timeout is not None:
        timeout = uri.timeout
    if uri.transport not in (Transport.UNIX, Transport.TCP):
        raise AttachError(f"{uri}: kernel nbd attach supports tcp and unix sockets only")
    try:
        sock = open_socket(uri.transport, uri.socket, uri.host, uri.port, timeout)
    except OSError as e:
        raise AttachError(f"cannot connect to {uri}: {e.strerror or e}") from None
    neg = cn.ClientNegotiation(uri.export, export_name_fallback=True)
    try:
        event = negotiate(neg, sock, time.monotonic() + timeout)
    except OSError as e:
        sock.close()
        raise AttachError(f"handshake with {uri} failed: {e.strerror or e}") from None
    except cn.OptionRefused as e:
        sock.close()
        raise AttachError(f"{uri}: export {uri.export!r} refused: {e.reason}"
                          + (f" ({e.message})" if e.message else "")) from None
    except ReplyError as e:
        sock.close()
        raise AttachError(f"{uri}: server broke the handshake: {e}") from None
    assert isinstance(event, cn.Negotiated)  # the plan ends in GO (or EXPORT_NAME)
    sock.settimeout(None)  # the kernel expects a blocking socket
    minimum = event.block_size[0] if event.block_size is not None else 512
    return KernelSocket(sock, event.size, event.tflags, _kernel_block_size(minimum))


def _kernel_block_size(minimum: int) -> int:
    # The kernel's logical block size is the smallest request it makes: the export's minimum
    # (as nbd-client's 512 by default), a power of two between 512 and the page size. The
    # preferred size would refuse 512-byte O_DIRECT on exports that take any size.
    size = 512
    while size < min(minimum, 4096):
        size *= 2
    return size
