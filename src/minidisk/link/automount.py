"""`minidisk automount /vmlink`: VMLINK, as our own autofs daemon.

Entering `/vmlink/owner.disk[.partition]` links the disk (in the mode the caller's grant
names, R when it names none), attaches it and mounts it there; once it has been idle for the
timeout, the kernel asks us to expire it and we unmount, detach and unlink. Unlike the stock
automount with a program map (§1.2 of the research notes), we see expiry, so links never
outlive their use.

Threads: the main thread reads packets and hands each to a small pool (a link takes about a
second, and other keys must not wait behind it); one key is worked on by one thread at a time;
an expiry thread calls EXPIRE_MULTI every quarter timeout. Every packet's token is answered,
READY or FAIL, whatever happens in between.

Keys are validated and normalised (`ALICE.191` → `alice.0191`); a key spelled differently
from its normal form becomes a symlink to it. Anything that is not a key, or names nothing in
the directory, is ENOENT — and the server that holds the directory audits the refusal.

On SIGTERM/SIGINT: catatonic first (every waiting and later lookup fails at once), then wait
for requests in progress, then unlink everything we linked, then unmount /vmlink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

from minidisk.link import linker
from minidisk.link.autofs import EXPIRE_INDIRECT, MISSING_INDIRECT, AutofsMount, Packet
from minidisk.link.names import parse_key

log = logging.getLogger(__name__)

WORKERS = 4


class Automounter:
    def __init__(self, root: str, server: str, timeout: int,
                 tls_certificates: str | None = None) -> None:
        self.root = Path(root)
        self.server = server
        self.timeout = timeout
        self.tls_certificates = tls_certificates
        self.mount: AutofsMount | None = None
        self.key_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.linked: dict[str, str] = {}  # mounted name under root -> disk (owner.disk)
        self.aliases: set[str] = set()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="automount")

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (in the main thread) or `stop()`."""
        self.mount = AutofsMount(self.root, self.timeout)
        previous = {sig: signal.signal(sig, self._signalled)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        expirer = threading.Thread(target=self._expire_loop, name="expire", daemon=True)
        expirer.start()
        log.info("serving %s (timeout %d s) for disks at %s", self.root, self.timeout,
                 self.server)
        try:
            if on_ready is not None:
                on_ready()
            while (packet := self.mount.read_packet()) is not None:
                self.pool.submit(self._answer, packet)
        finally:
            self.stop()
            expirer.join(timeout=5)
            self.pool.shutdown(wait=True)
            self._clean_up()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Catatonic now: no caller waits on us from here on; run() then cleans up."""
        self.stopping.set()
        if self.mount is not None:
            with contextlib.suppress(OSError):
                self.mount.go_catatonic()

    # -- requests --

    def _answer(self, packet: Packet) -> None:
        assert self.mount is not None
        ok = False
        try:
            if self.stopping.is_set():
                return
            with self.key_locks[packet.name]:
                if packet.type == MISSING_INDIRECT:
                    ok = self._mount(packet)
                elif packet.type == EXPIRE_INDIRECT:
                    ok = self._expire(packet.name)
        except Exception:
            log.exception("%s: request failed", packet.name)
        finally:
            (self.mount.ready if ok else self.mount.fail)(packet.token)

    def _mount(self, packet: Packet) -> bool:
        name = packet.name
        path = self.root / name
        if name in self.linked or name in self.aliases:
            return True  # a second packet for a name we already serve (lstat, then stat)
        try:
            key = parse_key(name)
        except ValueError:
            key = None
        # Asked even for a bad key: the server validates it again and audits the refusal.
        try:
            found = linker.resolve(name, self.server, self.tls_certificates)
        except linker.LinkError as e:
            log.info("%s: %s", name, e)
            return False
        if key is None:
            return False
        canonical = str(key)
        if canonical != name:
            with self.key_locks[canonical]:
                if canonical not in self.linked and not self._link(canonical, found, packet):
                    return False
            os.symlink(canonical, path)
            self.aliases.add(name)
            return True
        return self._link(canonical, found, packet)

    def _link(self, name: str, found: dict[str, object], packet: Packet) -> bool:
        path = self.root / name
        mode = str(found.get("grant") or "R")
        try:
            state = linker.link(name, self.server, mountpoint=str(path), mode=mode,
                                tls_certificates=self.tls_certificates,
                                on_behalf_of=f"automount uid:{packet.uid} pid:{packet.pid}")
        except linker.LinkError as e:
            log.warning("%s: %s", name, e)
            with contextlib.suppress(OSError):
                path.rmdir()
            return False
        self.linked[name] = state.disk
        log.info("%s", state.summary())
        return True

    def _expire(self, name: str) -> bool:
        path = self.root / name
        if name in self.aliases:
            path.unlink(missing_ok=True)
            self.aliases.discard(name)
            return True
        if name not in self.linked:
            return True
        try:
            linker.unlink(self.linked[name])
        except linker.LinkError as e:
            log.warning("expiring %s: %s", name, e)
            return False
        del self.linked[name]
        with contextlib.suppress(OSError):
            path.rmdir()
        log.info("%s expired: unmounted, detached, unlinked", name)
        return True

    def _expire_loop(self) -> None:
        interval = max(0.5, self.timeout / 4)
        while not self.stopping.wait(interval):
            mount = self.mount
            assert mount is not None
            try:
                while not self.stopping.is_set() and mount.expire_one():
                    pass
            except OSError as e:
                log.warning("expire: %s", e)

    # -- exit --

    def _clean_up(self) -> None:
        for name in list(self.aliases):
            with contextlib.suppress(OSError):
                (self.root / name).unlink()
        self.aliases.clear()
        for name in list(self.linked):
            try:
                linker.unlink(self.linked[name])
            except linker.LinkError as e:
                log.error("leaving %s behind: %s", name, e)
                continue
            del self.linked[name]
            with contextlib.suppress(OSError):
                (self.root / name).rmdir()
        if self.mount is not None:
            self.mount.close()
            self.mount = None


def program_map_entry(key: str, server: str, tls_certificates: str | None = None) -> str:
    """For the stock automount's program maps: link and attach the disk `key` names and
    return the map entry that mounts it (`-fstype=ext4,ro :/dev/loop3`). The stock daemon
    has no unmount hook, so the link lasts until `minidisk unlink owner.disk`, or until
    `minidisk unlink --idle` (from a timer) finds its device unmounted."""
    from minidisk.kernel.mount import detect_filesystem

    parsed = parse_key(key)
    if parsed.partition is not None:
        raise linker.LinkError("program maps serve whole disks only")
    found = linker.resolve(key, server, tls_certificates)
    state = linker.link(str(parsed), server, mode=str(found.get("grant") or "R"),
                        tls_certificates=tls_certificates, on_behalf_of=linker.PROGRAM_MAP)
    fstype = detect_filesystem(state.device) or "auto"
    options = f"-fstype={fstype}" + (",ro" if state.read_only else "")
    return f"{options} :{state.device}"
