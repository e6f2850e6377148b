"""`attach` and `detach`: pick a backend, bring an export online, take it down again.

Backends, best first:
  netlink  kernel nbd configured over generic netlink (no process has to stay behind)
  ioctl    kernel nbd configured by ioctls, a helper process blocked in NBD_DO_IT
  nbdfuse  nbdfuse + loop device, for kernels without nbd (the CI machines)
"""

from __future__ import annotations

import os
import stat

from minidisk.kernel import state
from minidisk.kernel.defaults import DEFAULT_TIMEOUT
from minidisk.kernel.errors import AttachError, NotAttachedError
from minidisk.kernel.uri import parse_nbd_uri
from minidisk.nbd.transport import Transport
from minidisk.nbd.uri import NBDURI

METHODS = ("auto", "netlink", "ioctl", "nbdfuse")


# The backends are imported where used: a command pays for every module it imports (most in
# a TCG guest), and detach needs one backend, --help none.

def choose_method(uri: NBDURI, method: str = "auto") -> str:
    from minidisk.kernel import fuseloop, nbdkernel

    if method not in METHODS:
        raise AttachError(f"unknown attach method {method!r}; use one of {', '.join(METHODS)}")
    if method in ("netlink", "ioctl"):
        kernel = nbdkernel.available()
        if kernel is None:
            raise AttachError(f"--method {method}: this kernel has no nbd driver loaded: "
                              "run `modprobe nbd` (or use --method nbdfuse)")
        if method == "netlink" and kernel != "netlink":
            raise AttachError("--method netlink: the nbd driver has no netlink interface "
                              "here (only /dev/nbdN ioctls): use --method ioctl")
        return method
    if method != "auto":
        return method
    # The kernel client speaks plain NBD only; TLS URIs go through libnbd in nbdfuse.
    if not uri.tls and uri.transport is not Transport.VSOCK:
        kernel = nbdkernel.available()
        if kernel:
            return kernel
    if fuseloop.available():
        return "nbdfuse"
    raise AttachError("no way to attach here: no nbd kernel module, and no /dev/fuse, "
                      "nbdfuse (libnbd-bin) or losetup")


def attach(uri_text: str, *, read_only: bool = False, method: str = "auto",
           connect_as: tuple[int, int] | None = None, connections: int | None = None,
           timeout: int | None = None, persist_wait: int | None = None,
           truncate: bool = False) -> state.Attachment:
    """Bring the export at `uri_text` online as a kernel block device; return its state.
    With `connect_as` (uid, gid) the NBD connections are made by a process of that identity
    (the server then admits whom that user's link admits, not root): only nbdfuse can, as
    the kernel's own client connects from this process. `connections` (default 1) and
    `timeout` (seconds, default DEFAULT_TIMEOUT) are kernel nbd's, as nbd-client's
    -C and -t. `persist_wait` (seconds) makes the device outlive a restart of its server
    (persist.py): I/O waits that long for the server to come back. An export whose size is
    not a whole number of blocks is refused unless `truncate` (sizing.py).

    Returns once the device is usable; helpers it needed keep running after we exit.
    """
    uri = parse_nbd_uri(uri_text)
    chosen = choose_method(uri, "nbdfuse" if connect_as is not None else method)
    if connect_as is not None and method not in ("auto", "nbdfuse"):
        raise AttachError(f"attach method {method} cannot connect as another user")
    if chosen == "nbdfuse":
        given = [name for name, value in (("--connections", connections), ("--timeout", timeout),
                                          ("--persist", persist_wait)) if value is not None]
        if given:
            raise AttachError(f"{' and '.join(given)}: kernel nbd's only; nbdfuse was chosen "
                              "(give --method netlink or ioctl)")
        from minidisk.kernel import fuseloop

        return fuseloop.attach(uri, read_only, connect_as, truncate=truncate)
    from minidisk.kernel import nbdkernel

    return nbdkernel.attach(uri, read_only, use_netlink=chosen == "netlink",
                            connections=1 if connections is None else connections,
                            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
                            persist_wait=persist_wait, truncate=truncate)


def device_name(device: str) -> str:
    """`loop3`, `/dev/loop3` or a symlink to it → `loop3`; unknown paths are an error."""
    path = device if "/" in device else f"/dev/{device}"
    name = os.path.basename(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        # A kernel nbd device destroyed by a server disconnect leaves only our state behind.
        if state.state_path(name).exists():
            return name
        raise NotAttachedError(f"{device}: no such device") from None
    if not stat.S_ISBLK(mode):
        raise NotAttachedError(f"{device} is not a block device")
    return name


def detach(device: str) -> None:
    """Take down an attachment made by `attach`, in order; safe to repeat after a failure."""
    with state.locked(device_name(device)) as attachment:
        if attachment.method == "nbdfuse":
            from minidisk.kernel import fuseloop

            fuseloop.detach(attachment)
        else:
            from minidisk.kernel import nbdkernel

            nbdkernel.detach(attachment)
