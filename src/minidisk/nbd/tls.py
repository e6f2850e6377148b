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
    """RFC 4514-style subject of the verified peer certificate, most specific part first."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    parts = []
    for rdn in reversed(cert.get("subject", ())):
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O",
                     "organizationalUnitName": "OU", "countryName": "C",
                     "localityName": "L", "stateOrProvinceName": "ST"}.get(key, key)
            parts.append(f"{short}={value}")
    return ",".join(parts)
