"""NBD URIs for attach: minidisk.nbd.uri's one parser, its error a KernelError.

attach connects kernel nbd sockets itself (tcp, unix) and hands nbdfuse the URI's text, with
a relative unix socket path made absolute (nbdfuse runs with cwd "/" and outlives us).
"""

from __future__ import annotations

from minidisk.kernel.errors import BadUriError
from minidisk.nbd.uri import NBDURI, BadURI


def parse_nbd_uri(text: str) -> NBDURI:
    try:
        return NBDURI.parse(text)
    except BadURI as e:
        raise BadUriError(str(e)) from None
