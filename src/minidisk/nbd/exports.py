"""What the NBD server serves: a source of named exports, and who is asking.

The server never imports the namespace; anything with `export_names` and `open_export`
will do (the daemon passes its namespace, tests and `serve_object` pass a `DictExports`).
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from minidisk.device.api import BlockDevice
from minidisk.nbd.transport import Transport


@dataclass(frozen=True, slots=True)
class Identity:
    """The peer of a connection, as far as the transport can prove it.

    `subject` is the verified TLS client certificate's subject (RFC 4514 string) when the
    client presented one; `uid`/`gid`/`pid` come from SO_PEERCRED on unix sockets.
    """

    transport: Transport
    address: str = ""
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    subject: str | None = None
    tls: bool = False


class OpenedExport(Protocol):
    device: BlockDevice
    name: str
    description: str

    def close(self) -> None: ...


class ExportSource(Protocol):
    def export_names(self) -> list[str]: ...

    def open_export(self, name: str) -> OpenedExport: ...


class Access(enum.Enum):
    """What an export policy grants one identity on one export."""

    DENY = "deny"  # not listed; ERR_POLICY at INFO/GO; EXPORT_NAME hangs up
    READ_ONLY = "read-only"  # served with READ_ONLY set: writes fail with EPERM
    READ_WRITE = "read-write"


# An export policy: may this identity see and open this export, and how?
ExportPolicy = Callable[[Identity, str], Access]


def allow_all(identity: Identity, name: str) -> Access:
    return Access.READ_WRITE


# A control policy, shaped like an export policy: may this identity send control commands?
# (Which commands is the control table's business; this decides whether the option is
# offered at all.)
ControlPolicy = Callable[[Identity], bool]


# Where SO_PEERCRED proves a peer's uid (stdin/stdout may be a socketpair of our parent's).
_LOCAL = (Transport.UNIX, Transport.STDIO)


@dataclass(frozen=True, slots=True)
class Administrators:
    """The default control policy: our own uid (or root) on a unix socket, or a TLS client
    whose verified certificate subject is one of `subjects`. Plain TCP peers never: a
    certificate proves who a client is, not that it may halt us."""

    subjects: frozenset[str] = frozenset()

    def __call__(self, identity: Identity) -> bool:
        if identity.transport in _LOCAL and identity.uid is not None:
            return identity.uid in (0, os.geteuid())
        return identity.tls and identity.subject in self.subjects


# The server's default: our uid or root on a unix socket; no TLS subject is an administrator.
local_admins = Administrators()


def authenticated(identity: Identity) -> bool:
    """The transport proved who the peer is: SO_PEERCRED, or a verified TLS subject."""
    return identity.uid is not None or (identity.tls and bool(identity.subject))


@dataclass(slots=True)
class _Opened:
    device: BlockDevice
    name: str
    description: str
    closed: bool = field(default=False)

    def close(self) -> None:
        self.closed = True


class DictExports:
    """A fixed map of export names to devices; the first one is also the default ("")."""

    def __init__(self, devices: dict[str, BlockDevice]) -> None:
        self.devices = {name.lstrip("/"): dev for name, dev in devices.items()}

    def export_names(self) -> list[str]:
        return list(self.devices)

    def open_export(self, name: str) -> OpenedExport:
        name = name.lstrip("/")
        if name == "" and self.devices:
            name = next(iter(self.devices))
        try:
            device = self.devices[name]
        except KeyError:
            raise OSError(errno.ENOENT, f"no export {name!r}") from None
        return _Opened(device, name, device.describe())
