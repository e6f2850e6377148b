"""Attach through the kernel's nbd driver: netlink where the family exists, else ioctls.

The CI machines' kernel has no nbd module: tests/vm boots Debian's kernel in a guest and runs
both paths there, row by row against nbd-client. The kernel calls follow
include/uapi/linux/nbd.h and nbd-netlink.h and what nbd-client does.

Both paths connect and negotiate the sockets themselves (handshake.py), then hand them to the
kernel, which speaks the transmission phase from then on. With netlink the kernel keeps the
sockets and nothing stays behind (DESTROY_ON_DISCONNECT removes the device when it ends); with
ioctls a forked helper must block in NBD_DO_IT for the life of the device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from minidisk.kernel import state
from minidisk.kernel.commands import Helper, wait_until
from minidisk.kernel.defaults import DEFAULT_TIMEOUT, KEEPER, MAX_CONNECTIONS
from minidisk.kernel.errors import AttachError, DetachError
from minidisk.kernel.mount import refuse_if_in_use
from minidisk.kernel.netlink import GenericNetlink, attr, attr_nested, attr_u32, attr_u64
from minidisk.kernel.sizing import whole_blocks
from minidisk.nbd.protocol import TFLAG_READ_ONLY
from minidisk.nbd.uri import NBDURI
from minidisk.privatedir import private_dir

if TYPE_CHECKING:  # imported where used: `detach` needs neither the handshake nor persist
    from minidisk.kernel.handshake import KernelSocket


# nbd-netlink.h
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_LINK_DEAD = 4
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_ATTR_BACKEND_IDENTIFIER = 10
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0

# nbd.h: _IO(0xab, n)
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A


def available() -> str | None:
    """"netlink" or "ioctl" when the kernel has nbd, else None."""
    if not (os.path.exists("/sys/module/nbd") or os.path.exists("/dev/nbd0")):
        return None
    try:
        with GenericNetlink() as nl:
            nl.family("nbd")
        return "netlink"
    except OSError:
        return "ioctl" if os.path.exists("/dev/nbd0") else None


def _connect_all(uri: NBDURI, connections: int) -> list[KernelSocket]:
    """`connections` negotiated sockets to the export; more than one only with multi-conn."""
    from minidisk.kernel.handshake import connect
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise AttachError(f"--connections {connections}: give 1 to {MAX_CONNECTIONS}")
    links = [connect(uri)]
    try:
        if connections > 1 and not links[0].multi_conn:
            # Without NBD_FLAG_CAN_MULTI_CONN a flush on one connection need not cover writes
            # made on another: the kernel's flushes would promise what the server does not.
            raise AttachError(f"{uri}: the server does not allow more than one connection "
                              "(no NBD_FLAG_CAN_MULTI_CONN); attach with --connections 1")
        while len(links) < connections:
            links.append(connect(uri))
    except BaseException:
        for link in links:
            link.sock.close()
        raise
    return links


def attach(uri: NBDURI, read_only: bool, *, use_netlink: bool, connections: int = 1,
           timeout: int = DEFAULT_TIMEOUT, persist_wait: int | None = None,
           truncate: bool = False) -> state.Attachment:
    """`persist_wait` (seconds) keeps the device through server restarts (persist.py);
    `truncate` lets an export of a partial last block come online without it (sizing.py)."""
    if timeout < 0:
        raise AttachError(f"--timeout {timeout}: give seconds >= 0 (0: wait forever)")
    if persist_wait is not None:
        if not use_netlink:
            raise AttachError("--persist reconnects through netlink; the ioctl method cannot")
        if timeout == 0:
            # A request in flight when the server died is retried only once it times out.
            raise AttachError("--persist needs a --timeout above 0")
        if persist_wait < 1:
            raise AttachError(f"--persist-wait {persist_wait}: give seconds >= 1")
    links = _connect_all(uri, connections)
    try:
        size = whole_blocks(uri, links[0].size, links[0].block_size, truncate)
        flags = links[0].flags | (TFLAG_READ_ONLY if read_only else 0)
        read_only = read_only or links[0].read_only
        if use_netlink:
            return _attach_netlink(uri, read_only, links, size, flags, timeout, persist_wait)
        return _attach_ioctl(uri, read_only, links, size, flags, timeout)
    finally:
        for link in links:  # the kernel holds its own references now
            link.sock.close()


def _attach_netlink(uri: NBDURI, read_only: bool, links: list[KernelSocket], size: int,
                    flags: int, timeout: int, persist_wait: int | None) -> state.Attachment:
    identifier = f"minidisk-{secrets.token_hex(6)}"
    sockets = [attr_nested(NBD_SOCK_ITEM, [attr_u32(NBD_SOCK_FD, link.sock.fileno())])
               for link in links]
    from minidisk.kernel import persist  # here: only attach needs it

    events = persist.subscribe() if persist_wait is not None else None
    attachment: state.Attachment | None = None
    try:
        with GenericNetlink() as nl:
            reply = nl.request(nl.family("nbd"), NBD_CMD_CONNECT, 1, [
                attr_u64(NBD_ATTR_SIZE_BYTES, size),
                attr_u64(NBD_ATTR_BLOCK_SIZE_BYTES, links[0].block_size),
                attr_u64(NBD_ATTR_SERVER_FLAGS, flags),
                attr_u64(NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT),
                *([attr_u64(NBD_ATTR_TIMEOUT, timeout)] if timeout else []),
                *([attr_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, persist_wait)]
                  if persist_wait is not None else []),
                attr(NBD_ATTR_BACKEND_IDENTIFIER, identifier.encode() + b"\0"),
                attr_nested(NBD_ATTR_SOCKETS, sockets),
            ])
        index = struct.unpack("=I", reply[NBD_ATTR_INDEX][:4])[0]
        attachment = state.Attachment(device=f"/dev/nbd{index}", method="netlink",
                                      uri=str(uri), read_only=read_only, nbd_index=index,
                                      backing_file=identifier)
    except OSError as e:
        raise AttachError(f"nbd netlink CONNECT failed: {e.strerror or e}") from None
    finally:
        if events is not None and attachment is None:
            events[0].close()
    assert attachment is not None  # CONNECT either gave an index or raised
    try:
        _wait_for_node(attachment)
        if events is not None:
            private_dir(state.state_dir())
            log = state.state_dir() / f"{attachment.name}.keeper.log"
            keeper = persist.start_keeper(*events, uri, index, identifier,
                                          persist.Export.of(links[0]), log)
            attachment.helpers.append(keeper)
    except BaseException:
        # The kernel has the device: take it down again rather than leave it unmanaged.
        with contextlib.suppress(OSError):
            _disconnect_netlink(index)
        raise
    state.save(attachment)
    return attachment


def _attach_ioctl(uri: NBDURI, read_only: bool, links: list[KernelSocket], size: int,
                  flags: int, timeout: int) -> state.Attachment:
    # By number, not by count: netlink's DESTROY_ON_DISCONNECT leaves gaps (nbd0 gone, nbd1 on).
    indexes = sorted(int(p.name[3:]) for p in Path("/sys/block").glob("nbd*")
                     if p.name[3:].isdigit())
    for index in indexes:
        if os.path.exists(f"/sys/block/nbd{index}/pid"):
            continue  # connected already
        device = f"/dev/nbd{index}"
        fd = os.open(device, os.O_RDWR)
        try:
            fcntl.ioctl(fd, NBD_SET_SOCK, links[0].sock.fileno())
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EBUSY:  # someone else took it in the meantime
                continue
            raise AttachError(f"NBD_SET_SOCK on {device}: {e.strerror}") from None
        try:
            for link in links[1:]:
                fcntl.ioctl(fd, NBD_SET_SOCK, link.sock.fileno())
            fcntl.ioctl(fd, NBD_SET_BLKSIZE, links[0].block_size)
            fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, size // links[0].block_size)
            fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
            if timeout:
                fcntl.ioctl(fd, NBD_SET_TIMEOUT, timeout)
            helper = _fork_do_it(fd, device)
        except BaseException as e:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
            if isinstance(e, OSError):
                raise AttachError(f"configuring {device}: {e.strerror}") from None
            raise
        finally:
            os.close(fd)
        attachment = state.Attachment(device=device, method="ioctl", uri=str(uri),
                                      read_only=read_only, nbd_index=index, helpers=[helper])
        state.save(attachment)
        return attachment
    raise AttachError("no free /dev/nbdN device")


def _fork_do_it(fd: int, device: str) -> Helper:
    """Fork the process that sits in NBD_DO_IT until the device is disconnected."""
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup may run here, hence os._exit
        try:
            os.setsid()
            # Signals must not interrupt DO_IT (that would tear the device down); detach
            # ends it with NBD_DISCONNECT instead.
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            null = os.open("/dev/null", os.O_RDWR)
            for std in (0, 1, 2):  # never hold our caller's pipes open
                os.dup2(null, std)
            os.closerange(3, fd)
            os.closerange(fd + 1, 65536)
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, NBD_DO_IT)
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, NBD_CLEAR_QUE)
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, NBD_CLEAR_SOCK)
        finally:
            os._exit(0)
    name = os.path.basename(device)
    helper = Helper.of("nbd-do-it", pid)
    if not wait_until(lambda: os.path.exists(f"/sys/block/{name}/pid") or not helper.alive(),
                      10.0) or not helper.alive():
        raise AttachError(f"{device}: NBD_DO_IT did not start")
    return helper


def _wait_for_node(attachment: state.Attachment) -> None:
    if not wait_until(lambda: os.path.exists(attachment.device), 10.0):
        raise AttachError(f"{attachment.device} did not appear (is udev/devtmpfs running?)")


def backend(index: int) -> str | None:
    """The backend identifier netlink attach gave /dev/nbdINDEX, None when it has none."""
    try:
        return Path(f"/sys/block/nbd{index}/backend").read_text().strip()
    except OSError:
        return None


def _disconnect_netlink(index: int) -> None:
    with GenericNetlink() as nl:
        nl.request(nl.family("nbd"), NBD_CMD_DISCONNECT, 1, [attr_u32(NBD_ATTR_INDEX, index)])


def _connected(attachment: state.Attachment) -> bool:
    if not Path(f"/sys/block/{attachment.name}/pid").exists():
        return False
    if attachment.method == "netlink":
        # The index may have been reused after the server ended our connection.
        found = backend(attachment.nbd_index)
        return found is None or found == attachment.backing_file
    return True


def detach(attachment: state.Attachment) -> None:
    device = attachment.device
    # A keeper first: it must not hand the kernel a new socket while we take the device down.
    for keeper in [h for h in attachment.helpers if h.name == KEEPER]:
        try:
            keeper.stop(0.0)
        except (TimeoutError, PermissionError) as e:
            raise DetachError(str(e)) from None
    if _connected(attachment):
        refuse_if_in_use(device)
        try:
            if attachment.method == "netlink":
                _disconnect_netlink(attachment.nbd_index)
            else:
                fd = os.open(device, os.O_RDWR)
                try:
                    fcntl.ioctl(fd, NBD_DISCONNECT)
                finally:
                    os.close(fd)
        except OSError as e:
            raise DetachError(f"disconnecting {device}: {e.strerror or e}") from None
        if not wait_until(lambda: not _connected(attachment), 10.0):
            raise DetachError(f"{device} is still connected after the disconnect request")
    for helper in attachment.helpers:
        try:
            helper.stop(10.0)
        except (TimeoutError, PermissionError) as e:
            raise DetachError(str(e)) from None
    state.remove(attachment)
