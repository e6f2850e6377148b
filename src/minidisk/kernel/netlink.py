"""Just enough generic netlink to resolve a family and send it one request (stdlib only).

Messages are `nlmsghdr` + `genlmsghdr` + attributes; attributes are (len, type, value)
padded to 4 bytes, nested ones carry NLA_F_NESTED.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLA_F_NESTED = 1 << 15
REQUEST_TIMEOUT = 30.0  # seconds a request waits for the kernel's answer

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
GENLMSGHDR = struct.Struct("=BBH")  # command, version, reserved
NLATTR = struct.Struct("=HH")  # length, type

Attribute = tuple[int, bytes]


def attr(kind: int, value: bytes) -> bytes:
    raw = NLATTR.pack(NLATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def attr_nested(kind: int, children: Sequence[bytes]) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def parse_attrs(data: bytes) -> dict[int, bytes]:
    found, offset = {}, 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + NLATTR.size:offset + length]
        offset += (length + 3) & ~3
    return found


class GenericNetlink:
    """One NETLINK_GENERIC socket; requests are synchronous and ask for an ACK."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.settimeout(REQUEST_TIMEOUT)
        self.sequence = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenericNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def family(self, name: str) -> int:
        """The id of family `name`; FileNotFoundError when no module registered it."""
        return self._family(name)[0]

    def join(self, family: str, group: str) -> int:
        """Receive the multicasts of `family`'s `group` on this socket from now on; return
        the family's id (events carry it as their message type)."""
        family_id, groups = self._family(family)
        if group not in groups:
            raise FileNotFoundError(f"generic netlink family {family} has no group {group}")
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups[group])
        return family_id

    def _family(self, name: str) -> tuple[int, dict[str, int]]:
        reply = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1,
                             [attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")])
        groups = {}
        for item in parse_attrs(reply.get(CTRL_ATTR_MCAST_GROUPS, b"")).values():
            fields = parse_attrs(item)
            if CTRL_ATTR_MCAST_GRP_NAME in fields and CTRL_ATTR_MCAST_GRP_ID in fields:
                group = fields[CTRL_ATTR_MCAST_GRP_NAME].rstrip(b"\0").decode()
                groups[group] = struct.unpack("=I", fields[CTRL_ATTR_MCAST_GRP_ID][:4])[0]
        return int(struct.unpack("=H", reply[CTRL_ATTR_FAMILY_ID][:2])[0]), groups

    def event(self, family: int, timeout: float) -> tuple[int, dict[int, bytes]] | None:
        """The next multicast message of `family` as (command, attributes), or None when
        none came within `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(REQUEST_TIMEOUT)
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
            if length < NLMSGHDR.size + GENLMSGHDR.size:
                break
            payload = data[offset + NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3
            if kind == family:
                command = GENLMSGHDR.unpack_from(payload)[0]
                return command, parse_attrs(payload[GENLMSGHDR.size:])
        return None

    def request(self, family: int, command: int, version: int,
                attrs: Sequence[bytes]) -> dict[int, bytes]:
        """Send one request; return the attributes of its reply ({} for a bare ACK)."""
        self.sequence += 1
        body = GENLMSGHDR.pack(command, version, 0) + b"".join(attrs)
        header = NLMSGHDR.pack(NLMSGHDR.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK,
                               self.sequence, 0)
        self.sock.send(header + body)
        result: dict[int, bytes] = {}
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _, sequence, _ = NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if sequence != self.sequence:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code == 0:  # the ACK, after any reply message
                        return result
                    raise OSError(-code, f"{os.strerror(-code)} (generic netlink)")
                result = parse_attrs(payload[GENLMSGHDR.size:])

