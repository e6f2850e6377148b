"""Certificates for the TLS tests: a CA and what it signs, in nbdkit's layout (a directory with
ca-cert.pem and server-cert.pem + server-key.pem or client-cert.pem + client-key.pem), with the
extensions GnuTLS (libnbd, nbdinfo, nbdfuse, qemu) insists on. tests/nbd/test_tls.py keeps a
server and a client in one directory; tests/link (link_helpers.make_pki) one per principal."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "minidisk tests"
VALID = datetime.timedelta(days=30)


def subject(cn: str) -> str:
    """The subject the server proves for `cn`'s certificate (most specific first)."""
    return f"CN={cn},O={ORGANIZATION}"


def _name(cn: str, organization: bool = True) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)] *
                     organization + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Authority:
    """A CA of its own (EC P-256), valid from yesterday for VALID."""

    def __init__(self, cn: str = "minidisk test CA") -> None:
        self.now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(self.now - datetime.timedelta(days=1))
                     .not_valid_after(self.now + VALID)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                    critical=True)
                     .add_extension(x509.KeyUsage(False, False, False, False, False, True,
                                                  True, False, False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, directory: Path, cn: str, role: Literal["server", "client"],
              organization: bool = True) -> None:
        """Write ca-cert.pem and ROLE-cert.pem + ROLE-key.pem (0600) into `directory` (made
        if missing, 0700). A server certificate names localhost and 127.0.0.1; without
        `organization` the CN is the whole subject (any text a CA might sign)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / "ca-cert.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else \
            ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(cn, organization))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(self.now - datetime.timedelta(days=1))
                   .not_valid_after(self.now + VALID)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                                False, False), True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), False))
        if role == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
        cert = builder.sign(self.key, hashes.SHA256())
        (directory / f"{role}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = directory / f"{role}-key.pem"
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)
