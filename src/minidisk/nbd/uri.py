"""NBD URIs in libnbd's syntax (NetworkBlockDevice/nbd doc/uri.md), for every client here.

    nbd://host[:port]/export            nbds://…            (TLS)
    nbd+unix:///export?socket=/path     nbds+unix:///…
    nbd+vsock://cid[:port]/export

The export name is the path without its first slash, percent-decoded. The parse is strict
(unknown query keys, fragments, repeated keys are errors) so that a typo is refused with a
clear message instead of being ignored, as libnbd ignores unknown keys. One extension:
``?timeout=SECONDS`` bounds how long a minidisk client waits for the server (libnbd, and so
nbdfuse, ignore it).

Pure: no sockets, nothing but urllib, so that commands that only attach stay light.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from minidisk.nbd.transport import Transport

NBD_PORT = 10809

# scheme → (transport, tls)
_SCHEMES = {
    "nbd": (Transport.TCP, False),
    "nbds": (Transport.TCP, True),
    "nbd+unix": (Transport.UNIX, False),
    "nbds+unix": (Transport.UNIX, True),
    "nbd+vsock": (Transport.VSOCK, False),
    "nbds+vsock": (Transport.VSOCK, True),
}
_QUERY_KEYS = {"socket", "tls-certificates", "tls-psk-file", "tls-username", "tls-verify-peer",
               "timeout"}


class BadURI(ValueError):
    """An NBD URI libnbd's syntax rejects (or that names something we cannot use)."""


@dataclass(frozen=True, slots=True)
class NBDURI:
    text: str  # the URI as it will be handed on (unix socket path made absolute)
    transport: Transport  # UNIX, TCP or VSOCK
    tls: bool
    export: str
    host: str = ""  # tcp host or vsock cid
    port: int = NBD_PORT
    socket: str = ""  # unix socket path (absolute)
    tls_certificates: str | None = None
    timeout: float | None = None  # ?timeout=SECONDS; None: the client's own default

    def __str__(self) -> str:
        return self.text

    @property
    def where(self) -> str:
        """The server's address, for messages."""
        return self.socket or f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> NBDURI:
        """The URI `text` names; BadURI says what is wrong with it."""
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise BadURI(f"bad NBD URI {text!r}: {e}") from None
        if parts.scheme not in _SCHEMES:
            known = ", ".join(f"{s}://" for s in _SCHEMES)
            raise BadURI(f"bad NBD URI {text!r}: scheme must be one of {known}")
        transport, tls = _SCHEMES[parts.scheme]
        if parts.fragment:
            raise BadURI(f"bad NBD URI {text!r}: a fragment (#…) means nothing here")
        if (parts.username or parts.password) and not tls:
            raise BadURI(f"bad NBD URI {text!r}: a user name only makes sense with TLS")
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        for key, values in query.items():
            if key not in _QUERY_KEYS:
                raise BadURI(f"bad NBD URI {text!r}: unknown query parameter {key!r}")
            if len(values) != 1:
                raise BadURI(f"bad NBD URI {text!r}: {key!r} given more than once")
        export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/")
                                      else parts.path)
        host = parts.hostname or ""
        given = {key: values[0] for key, values in query.items()}
        certs = given.get("tls-certificates")
        timeout = _timeout(text, given.get("timeout"))

        if transport is Transport.UNIX:
            if host or port is not None:
                raise BadURI(f"bad NBD URI {text!r}: {parts.scheme}:// takes no host or port; "
                             "write nbd+unix:///EXPORT?socket=PATH")
            socket_path = given.get("socket", "")
            if not socket_path:
                raise BadURI(f"bad NBD URI {text!r}: {parts.scheme}:// needs ?socket=PATH")
            # nbdfuse runs with cwd "/" and outlives us, so a relative path is resolved now.
            absolute = os.path.abspath(socket_path)
            if absolute != socket_path:
                given["socket"] = absolute
                new_query = urllib.parse.urlencode(given, safe="/",
                                                   quote_via=urllib.parse.quote)
                # Not urlunsplit: it drops the "//" of an empty authority for unknown schemes.
                text = f"{parts.scheme}://{parts.path}?{new_query}"
            return cls(text=text, transport=transport, tls=tls, export=export,
                       socket=absolute, port=0, tls_certificates=certs, timeout=timeout)

        if "socket" in given:
            raise BadURI(f"bad NBD URI {text!r}: ?socket= belongs to nbd+unix:// URIs")
        if not host:
            raise BadURI(f"bad NBD URI {text!r}: {parts.scheme}:// needs a host")
        if transport is Transport.VSOCK and not host.isdigit():
            raise BadURI(f"bad NBD URI {text!r}: a vsock host must be a numeric CID")
        return cls(text=text, transport=transport, tls=tls, export=export, host=host,
                   port=NBD_PORT if port is None else port, tls_certificates=certs,
                   timeout=timeout)


def _timeout(uri: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise BadURI(f"bad NBD URI {uri!r}: timeout={text} is not a positive number of "
                     "seconds")
    return value


def format_uri(address: str | tuple[str, int], export: str = "", tls: bool = False) -> str:
    """The URI a client uses to reach `export` at a listening socket's address (a unix path,
    or a TCP (host, port)), as nbdkit --print-uri prints it; parse() reads it back."""
    path = "/" + urllib.parse.quote(export, safe="")
    if isinstance(address, str):
        socket = urllib.parse.quote(address, safe="/")
        return f"{'nbds' if tls else 'nbd'}+unix://{path}?socket={socket}"
    host, port = address[0], address[1]
    if host in ("0.0.0.0", ""):  # listening everywhere: this machine reaches it on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    where = host if port == NBD_PORT else f"{host}:{port}"
    return f"{'nbds' if tls else 'nbd'}://{where}{path}"
