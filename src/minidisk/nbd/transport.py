"""How a connection reaches a server: the one name for a transport, on both sides.

A listener (listen.py) accepts on a unix socket, TCP, or stdin/stdout; a client (uri.py's
NBD URIs, the control client) connects over a unix socket, TCP or vsock. A socket inherited
through systemd activation is a unix or a TCP one, as its family says, so that an identity
proven over it (SO_PEERCRED) counts exactly as one over a socket we bound.

A `StrEnum`: its printed form is what users write and read ("unix", "tcp"), in URLs, logs
and messages alike. Pure, imports nothing, so that the lightest command may use it.
"""

from __future__ import annotations

import enum


class Transport(enum.StrEnum):
    UNIX = "unix"
    TCP = "tcp"  # IPv4 or IPv6
    VSOCK = "vsock"  # clients only: nbd+vsock:// URIs
    STDIO = "stdio"  # servers only: `-`, one connection on stdin/stdout (nbdkit -s)

    def __repr__(self) -> str:
        # As an Identity's field in the daemon's logs ("control halt by Identity(...)"):
        # the same text as when transports were strings.
        return repr(self.value)
