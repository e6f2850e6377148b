"""NBD URIs in libnbd's syntax (NetworkBlockDevice/nbd doc/uri.md).

    nbd://host[:port]/export            nbds://…            (TLS)
    nbd+unix:///export?socket=/path     nbds+unix:///…
    nbd+vsock://cid[:port]/export

The export name is the path without its first slash, percent-decoded. We parse only to refuse
bad input early with a clear message and to connect kernel nbd sockets ourselves; nbdfuse is
handed the (normalised) URI and parses it again with libnbd.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from minidisk.kernel.errors import BadUriError

DEFAULT_PORT = 10809

# scheme → (transport, tls)
_SCHEMES = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
    "nbd+vsock": ("vsock", False),
    "nbds+vsock": ("vsock", True),
}
_QUERY_KEYS = {"socket", "tls-certificates", "tls-psk-file", "tls-username", "tls-verify-peer"}


@dataclass(frozen=True)
class NbdUri:
    text: str  # the URI as it will be handed on (unix socket path made absolute)
    transport: str  # "tcp", "unix" or "vsock"
    tls: bool
    export: str
    host: str = ""  # tcp host or vsock cid
    port: int = DEFAULT_PORT
    socket: str = ""  # unix socket path (absolute)

    def __str__(self) -> str:
        return self.text


def parse_nbd_uri(text: str) -> NbdUri:
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise BadUriError(f"bad NBD URI {text!r}: {e}") from None
    if parts.scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise BadUriError(f"bad NBD URI {text!r}: scheme must be one of {known}")
    transport, tls = _SCHEMES[parts.scheme]
    if parts.fragment:
        raise BadUriError(f"bad NBD URI {text!r}: a fragment (#…) means nothing here")
    if parts.username or parts.password:
        if not tls:
            raise BadUriError(f"bad NBD URI {text!r}: a user name only makes sense with TLS")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    for key, values in query.items():
        if key not in _QUERY_KEYS:
            raise BadUriError(f"bad NBD URI {text!r}: unknown query parameter {key!r}")
        if len(values) != 1:
            raise BadUriError(f"bad NBD URI {text!r}: {key!r} given more than once")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    host = parts.hostname or ""

    if transport == "unix":
        if host or port is not None:
            raise BadUriError(
                f"bad NBD URI {text!r}: {parts.scheme}:// takes no host or port; "
                "write nbd+unix:///EXPORT?socket=PATH")
        socket_path = query.get("socket", [""])[0]
        if not socket_path:
            raise BadUriError(f"bad NBD URI {text!r}: {parts.scheme}:// needs ?socket=PATH")
        # nbdfuse runs with cwd "/" and outlives us, so a relative path must be resolved now.
        absolute = os.path.abspath(socket_path)
        if absolute != socket_path:
            query["socket"] = [absolute]
            new_query = urllib.parse.urlencode({k: v[0] for k, v in query.items()},
                                               safe="/", quote_via=urllib.parse.quote)
            # Not urlunsplit: it drops the "//" of an empty authority for unknown schemes.
            text = f"{parts.scheme}://{parts.path}?{new_query}"
        return NbdUri(text=text, transport=transport, tls=tls, export=export,
                      socket=absolute, port=0)

    if "socket" in query:
        raise BadUriError(f"bad NBD URI {text!r}: ?socket= belongs to nbd+unix:// URIs")
    if not host:
        raise BadUriError(f"bad NBD URI {text!r}: {parts.scheme}:// needs a host")
    if transport == "vsock" and not host.isdigit():
        raise BadUriError(f"bad NBD URI {text!r}: a vsock host must be a numeric CID")
    return NbdUri(text=text, transport=transport, tls=tls, export=export, host=host,
                  port=DEFAULT_PORT if port is None else port)
