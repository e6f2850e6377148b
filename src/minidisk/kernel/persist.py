"""`attach --persist`: a kernel nbd device that outlives a restart of its server.

What the kernel offers (drivers/block/nbd.c, Linux 6.1), netlink only:
- When a connection's server goes away the kernel marks that socket dead and multicasts
  NBD_CMD_LINK_DEAD, with the device's index, to the family's group "nbd_mc_group" (not when
  the user asked for the disconnect).
- With NBD_ATTR_DEAD_CONN_TIMEOUT, I/O to a device whose connections are all dead waits up to
  that long for a new one (wait_for_reconnect) instead of failing at once; a request that was in
  flight on the dead socket is requeued when its --timeout expires (without a timeout it would
  wait for ever), so a persistent attach needs one.
- NBD_CMD_RECONFIGURE with NBD_ATTR_SOCKETS puts a new socket in place of a dead one; the
  device's backend identifier must be given again (the kernel refuses a mismatch).

So attach joins the multicast group before it connects (no LINK_DEAD can come before anyone
listens) and forks a keeper that owns the subscription. On each LINK_DEAD for its device the
keeper connects and negotiates again, retrying with back-off, and hands the socket over only if
the export is the one the device was made from (same size, transmission flags and block size:
a file system on it must not see another disk). It ends when the device is no longer ours:
detached (detach stops it first), or destroyed by the kernel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minidisk.kernel.commands import Helper
from minidisk.kernel.defaults import KEEPER
from minidisk.kernel.errors import AttachError
from minidisk.kernel.handshake import KernelSocket, connect
from minidisk.kernel.nbdkernel import (
    NBD_ATTR_BACKEND_IDENTIFIER,
    NBD_ATTR_INDEX,
    NBD_ATTR_SOCKETS,
    NBD_CMD_LINK_DEAD,
    NBD_CMD_RECONFIGURE,
    NBD_SOCK_FD,
    NBD_SOCK_ITEM,
    backend,
)
from minidisk.kernel.netlink import GenericNetlink, attr, attr_nested, attr_u32
from minidisk.nbd.uri import NBDURI

MULTICAST_GROUP = "nbd_mc_group"  # NBD_GENL_MCAST_GROUP_NAME
POLL = 5.0  # seconds between checks that the device is still ours, when nothing happens
FIRST_RETRY, LAST_RETRY = 0.1, 5.0  # back-off between reconnect attempts, seconds


@dataclass(frozen=True)
class Export:
    """What the device was made from; a server must offer the same to be reconnected."""

    size: int
    flags: int
    block_size: int

    @classmethod
    def of(cls, link: KernelSocket) -> Export:
        return cls(link.size, link.flags, link.block_size)

    def mismatch(self, link: KernelSocket) -> str | None:
        for what, ours, theirs in (("size", self.size, link.size),
                                   ("transmission flags", self.flags, link.flags),
                                   ("block size", self.block_size, link.block_size)):
            if ours != theirs:
                return f"the export's {what} is now {theirs:#x}, the device's {ours:#x}"
        return None


def subscribe() -> tuple[GenericNetlink, int]:
    """A netlink socket receiving nbd's LINK_DEAD multicasts, and the family's id."""
    events = GenericNetlink()
    try:
        return events, events.join("nbd", MULTICAST_GROUP)
    except OSError as e:
        events.close()
        raise AttachError(f"--persist: cannot join nbd's netlink group: {e.strerror or e}") \
            from None


def start_keeper(events: GenericNetlink, family: int, uri: NBDURI, index: int,
                 identifier: str, export: Export, log_path: Path) -> Helper:
    """Fork the keeper of device `index`; it inherits `events`, which this process closes."""
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup of the parent's may run here
        status = 1
        try:
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                          0o600)
            null = os.open("/dev/null", os.O_RDWR)
            for std, fd in ((0, null), (1, log), (2, log)):  # never hold our caller's pipes
                os.dup2(fd, std)
            keep = events.sock.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, 65536)
            Keeper(events, family, uri, index, identifier, export).run()
            status = 0
        except BaseException as e:  # noqa: BLE001 - the last word of a process that ends
            with contextlib.suppress(Exception):
                print(f"nbd{index} keeper: {e!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(status)
    events.close()
    return Helper.of(KEEPER, pid)


class Keeper:
    """The loop of the keeper process (see the module's docstring)."""

    def __init__(self, events: GenericNetlink, family: int, uri: NBDURI, index: int,
                 identifier: str, export: Export,
                 connect_: Callable[[NBDURI], KernelSocket] = connect) -> None:
        self.events, self.family, self.uri = events, family, uri
        self.index, self.identifier, self.export = index, identifier, export
        self.connect = connect_

    def say(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} nbd{self.index}: {text}", file=sys.stderr, flush=True)

    def ours(self) -> bool:
        """The device still exists with the backend identifier attach gave it."""
        return backend(self.index) == self.identifier

    def run(self) -> None:
        self.say(f"keeping the connection to {self.uri}")
        while self.ours():
            event = self.events.event(self.family, POLL)
            if event is None:
                continue
            command, attrs = event
            if command != NBD_CMD_LINK_DEAD or NBD_ATTR_INDEX not in attrs:
                continue
            if struct.unpack("=I", attrs[NBD_ATTR_INDEX][:4])[0] != self.index:
                continue
            self.say("the connection died; reconnecting")
            self.reconnect()
        self.say("the device is gone; stopping")

    def reconnect(self) -> None:
        """Retry until one new socket is in the kernel's hands or the device is gone."""
        delay = FIRST_RETRY
        while self.ours():
            problem = self.attempt()
            if problem is None:
                self.say("reconnected")
                return
            self.say(f"{problem}; retrying in {delay:g} s")
            time.sleep(delay)
            delay = min(delay * 2, LAST_RETRY)

    def attempt(self) -> str | None:
        """One reconnect; None when it worked, else why not."""
        try:
            link = self.connect(self.uri)
        except AttachError as e:
            return str(e)
        try:
            mismatch = self.export.mismatch(link)
            if mismatch is not None:
                return f"not reconnecting: {mismatch}"
            socket_item = attr_nested(NBD_SOCK_ITEM, [attr_u32(NBD_SOCK_FD, link.sock.fileno())])
            with GenericNetlink() as nl:
                nl.request(self.family, NBD_CMD_RECONFIGURE, 1, [
                    attr_u32(NBD_ATTR_INDEX, self.index),
                    attr(NBD_ATTR_BACKEND_IDENTIFIER, self.identifier.encode() + b"\0"),
                    attr_nested(NBD_ATTR_SOCKETS, [socket_item]),
                ])
            return None
        except OSError as e:
            return f"RECONFIGURE failed: {e.strerror or e}"
        finally:
            link.sock.close()  # the kernel holds its own reference once it took it
