"""TLS with X.509 certificates in the nbdkit/qemu directory layout.

A certificates directory holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``
(and, for clients, ``client-cert.pem`` and ``client-key.pem``). Client certificates are
verified against the CA when presented (required with ``verify_peer``); the verified
subject becomes the connection's identity, which export policies can authorize by.
"""

from __future__ import annotations

import os
import ssl
from typing import Any


def server_context(cert_dir: str, verify_peer: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # proto.md: TLS 1.2 or later
    try:
        ctx.load_cert_chain(os.path.join(cert_dir, "server-cert.pem"),
                            os.path.join(cert_dir, "server-key.pem"))
        ctx.load_verify_locations(os.path.join(cert_dir, "ca-cert.pem"))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load TLS certificates from {cert_dir}: {e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_OPTIONAL
    return ctx


def client_context(cert_dir: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(os.path.join(cert_dir, "ca-cert.pem"))
    cert = os.path.join(cert_dir, "client-cert.pem")
    if os.path.exists(cert):
        ctx.load_cert_chain(cert, os.path.join(cert_dir, "client-key.pem"))
    ctx.check_hostname = False  # NBD URIs name sockets and IPs, not certificate hosts
    return ctx


def peer_subject(ssl_object: Any) -> str | None:
    """RFC 4514 subject of the verified peer certificate, most specific part first.

    Values are escaped as RFC 4514 says (`CN=a\\,O=b` is one CN), and the attributes of a
    multi-valued RDN are joined with `+`, so that no certificate can spell another's
    subject inside one of its values."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    parts = []
    for rdn in reversed(cert.get("subject", ())):
        parts.append("+".join(f"{_SHORT.get(key, key)}={_escape(value)}" for key, value in rdn))
    return ",".join(parts)


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def _escape(value: str) -> str:
    last = len(value) - 1
    return "".join("\\00" if c == "\0" else
                   "\\" + c if c in ',+"\\<>;' or (i == 0 and c in " #") or (i == last and c == " ")
                   else c for i, c in enumerate(value))
