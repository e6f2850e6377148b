"""Running dlmfs: connect to the lock manager, mount, serve FUSE requests on trio until
unmounted (`fusermount3 -u`) or signalled, then unmount and disconnect -- which releases every
lock the mount still held."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import pyfuse3
import trio

from minidisk.dlm.client import connect
from minidisk.dlmfs.fs import DlmFs

log = logging.getLogger("minidisk.dlmfs")


def run_dlmfs(mountpoint: str, url: str | None = None, *, wait_limit: float | None = None,
              exclusive: bool = False, debug: bool = False,
              ready: Callable[[], None] | None = None) -> None:
    """Mount dlmfs on `mountpoint` and serve it until unmounted or signalled. `wait_limit`:
    the longest a blocking open waits (None: until granted); `exclusive`: local opens
    exclude each other; `ready` is called once the mount is there."""
    if wait_limit is not None and wait_limit <= 0:
        raise ValueError("the wait limit must be positive")
    trio.run(_serve, mountpoint, url, wait_limit, exclusive, debug, ready)


async def _serve(mountpoint: str, url: str | None, wait_limit: float | None, exclusive: bool,
                 debug: bool, ready: Callable[[], None] | None) -> None:
    # prompt_unlock: an unlock counts once it is in the socket (the service handles it before
    # anyone's later request), so giving a lock way to another node costs no round trip.
    async with connect(url, name=f"dlmfs {mountpoint}", prompt_unlock=True) as client:
        async with trio.open_nursery() as nursery:
            fs = DlmFs(client, nursery, wait_limit=wait_limit, exclusive=exclusive)

            def lost() -> None:
                log.error("lock manager connection lost: every lock of %s is gone", mountpoint)
                for handle in fs.handles.values():
                    handle.wake_pollers()

            client.on_lost = lost
            # allow_other + default_permissions: every user may use the mount, and the kernel
            # applies the lock files' and domains' mode bits, as it does on dlmfs.
            options = set(pyfuse3.default_options) | {
                "fsname=dlmfs", "subtype=minidisk", "allow_other", "default_permissions"}
            if debug:
                options.add("debug")
            pyfuse3.init(fs, mountpoint, options)
            if ready is not None:
                ready()
            try:
                nursery.start_soon(_terminate_on_signal)
                await pyfuse3.main()  # returns once unmounted, or terminate()d by a signal
                await fs.purge_unlinked()
                nursery.cancel_scope.cancel()
            finally:
                pyfuse3.close(unmount=True)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
