"""`minidisk automount /vmlink`: VMLINK, as our own autofs daemon, one subtree per user.

Entering `/vmlink/LOGIN/owner.disk[.partition]` links the disk for the user LOGIN (in the
mode that user's grant names, R when it names none), attaches it and mounts it there; once it
has been idle for the timeout, the kernel asks us to expire it and we unmount, detach and
unlink. Unlike the stock automount with a program map (§1.2 of the research notes), we see
expiry, so links never outlive their use.

Whose link it is, and who may read it. The kernel tells us in each packet which uid looked a
name up. `/vmlink` itself holds one name per user: `/vmlink/LOGIN` (the decimal uid for a uid
without a passwd entry) answers only to that uid — anyone else's lookup of it is ENOENT — and
is a nested autofs mount owned by that user with mode 0700, so once it exists the kernel
keeps every other uid out of it (autofs asks us only for names not yet there, so a refusal
we would give in answer to a lookup could not protect what is already mounted; the directory
permission does, for every access). Under it, lookups come from that user alone, and the
link is made as that user: the resolve, the keeper that holds the link and the data
connections run with that user's groups, gid and uid (linker, asuser.py), so the server
admits exactly what that user's grants admit. Another user with a grant of its own enters its
own subtree and gets its own link. Attach and mount are ours (root), under the user's
subtree. We chose per-user subtrees over one shared name with a refusal for other uids: a
shared `/vmlink/alice.0191` could serve one user at a time, and a second user with a grant
of its own would be locked out of it until it expired.

Threads: the main thread reads packets (from every mount, one pipe) and hands each to a
small pool (a link takes about a second, and other keys must not wait behind it); one name
is worked on by one thread at a time; an expiry thread calls EXPIRE_MULTI on each user's
subtree every quarter timeout. Every packet's token is answered, READY or FAIL, whatever
happens in between. A user's subtree stays until we stop (the kernel never expires a nested
autofs mount from its parent).

Keys are validated and normalised (`ALICE.191` → `alice.0191`); a key spelled differently
from its normal form becomes a symlink to it. Anything that is not a key, or names nothing in
the directory, is ENOENT — and the server that holds the directory audits the refusal.

On SIGTERM/SIGINT: catatonic first (every waiting and later lookup fails at once), then wait
for requests in progress, then unlink everything we linked, then unmount the subtrees and
/vmlink.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from minidisk.kernel import mount as kernel_mount
from minidisk.link import linker
from minidisk.link.asuser import LocalUser
from minidisk.link.autofs import (
    EXPIRE_INDIRECT,
    MISSING_INDIRECT,
    AutofsMount,
    Packet,
    PacketPipe,
)
from minidisk.link.names import parse_key

log = logging.getLogger(__name__)

WORKERS = 4


def subtree_name(uid: int) -> str:
    """The name of `uid`'s subtree under /vmlink: its login, or its number if it has none."""
    return LocalUser(uid, 0).login or str(uid)


@dataclass
class Subtree:
    user: LocalUser
    mount: AutofsMount


class Automounter:
    def __init__(self, root: str, server: str, timeout: int,
                 tls_certificates: str | None = None) -> None:
        self.root = Path(root)
        self.server = server
        self.timeout = timeout
        self.tls_certificates = tls_certificates
        self.pipe: PacketPipe | None = None
        self.top: AutofsMount | None = None
        self.subtrees: dict[int, Subtree] = {}  # by the st_dev of its mount
        # Subtrees are made and stopped under it; reentrant: stop() also runs from a signal
        # handler, which may interrupt the main thread inside stop() itself.
        self.mounts_lock = threading.RLock()
        self.path_locks: defaultdict[Path, threading.Lock] = defaultdict(threading.Lock)
        self.linked: dict[Path, str] = {}  # mounted path -> link id (linker state)
        self.aliases: set[Path] = set()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="automount")

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (in the main thread) or `stop()`."""
        self.pipe = PacketPipe()
        self.top = AutofsMount(self.root, self.timeout, self.pipe)
        previous = {sig: signal.signal(sig, self._signalled)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        expirer = threading.Thread(target=self._expire_loop, name="expire", daemon=True)
        expirer.start()
        log.info("serving %s (timeout %d s) for disks at %s", self.root, self.timeout,
                 self.server)
        try:
            if on_ready is not None:
                on_ready()
            while (packet := self.pipe.read_packet()) is not None:
                self.pool.submit(self._answer, packet)
        finally:
            self.stop()
            expirer.join(timeout=5)
            self.pool.shutdown(wait=True)
            self._clean_up()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        self.stop()

    def stop(self) -> None:
        """Catatonic now: no caller waits on us from here on; run() then cleans up."""
        self.stopping.set()
        with self.mounts_lock:
            for mount in self._mounts():
                try:
                    mount.go_catatonic()
                except OSError as e:  # a caller may now wait until it gives up itself
                    log.warning("%s: cannot go catatonic: %s", mount.root, e)
            if self.pipe is not None:
                self.pipe.close_write_end()  # the reader sees the end once all let go

    def _mounts(self) -> list[AutofsMount]:
        return [subtree.mount for subtree in self.subtrees.values()] + \
            ([self.top] if self.top is not None else [])

    # -- requests --

    def _answer(self, packet: Packet) -> None:
        assert self.top is not None
        subtree = self.subtrees.get(packet.dev)
        mount = subtree.mount if subtree is not None else self.top
        ok = False
        try:
            if self.stopping.is_set():
                return
            with self.path_locks[(subtree.mount.root if subtree else self.root) / packet.name]:
                if packet.type == MISSING_INDIRECT:
                    ok = (self._open_subtree(packet) if subtree is None
                          else self._mount(subtree, packet))
                elif packet.type == EXPIRE_INDIRECT:
                    ok = subtree is None or self._expire(subtree, packet.name)
        except Exception:
            log.exception("%s: request failed", packet.name)
        finally:
            (mount.ready if ok else mount.fail)(packet.token)

    def _open_subtree(self, packet: Packet) -> bool:
        """`/vmlink/LOGIN`, for LOGIN's uid only: its own autofs mount, 0700, its own."""
        if packet.name != subtree_name(packet.uid):
            log.info("uid %d looked up %r: not its subtree (%s)", packet.uid, packet.name,
                     subtree_name(packet.uid))
            return False
        path = self.root / packet.name
        with self.mounts_lock:
            for subtree in self.subtrees.values():
                if subtree.mount.root == path:  # a second packet for it (lstat, then stat),
                    return subtree.user.uid == packet.uid  # or a login spelled as a uid
            if self.stopping.is_set() or self.pipe is None:
                return False
            user = LocalUser(packet.uid, packet.gid)
            mount = AutofsMount(path, self.timeout, self.pipe, owner=(user.uid, user.gid))
            self.subtrees[mount.dev] = Subtree(user, mount)
        log.info("%s: subtree of %s", path, user)
        return True

    def _mount(self, subtree: Subtree, packet: Packet) -> bool:
        name = packet.name
        path = subtree.mount.root / name
        if packet.uid != subtree.user.uid:  # root walks past the 0700; it has /vmlink/root
            log.info("uid %d looked up %s: not its subtree", packet.uid, path)
            return False
        if path in self.linked or path in self.aliases:
            return True  # a second packet for a name we already serve (lstat, then stat)
        try:
            key = parse_key(name)
        except ValueError:
            key = None
        # Asked even for a bad key: the server validates it again and audits the refusal.
        try:
            found = linker.resolve(name, self.server, self.tls_certificates, subtree.user)
        except linker.LinkError as e:
            log.info("%s: %s", path, e)
            return False
        if key is None:
            return False
        canonical = subtree.mount.root / str(key)
        if canonical != path:
            with self.path_locks[canonical]:
                if canonical not in self.linked and \
                        not self._link(subtree, canonical, found, packet):
                    return False
            os.symlink(canonical.name, path)
            self.aliases.add(path)
            return True
        return self._link(subtree, path, found, packet)

    def _link(self, subtree: Subtree, path: Path, found: dict[str, object],
              packet: Packet) -> bool:
        mode = str(found.get("grant") or "R")
        try:
            state = linker.link(path.name, self.server, mountpoint=str(path), mode=mode,
                                tls_certificates=self.tls_certificates,
                                on_behalf_of=f"automount pid:{packet.pid}",
                                as_user=subtree.user, resolved=found)
        except linker.LinkError as e:
            log.warning("%s: %s", path, e)
            with contextlib.suppress(OSError):
                path.rmdir()
            return False
        self.linked[path] = state.id
        log.info("%s for %s", state.summary(), subtree.user)
        return True

    def _expire(self, subtree: Subtree, name: str) -> bool:
        path = subtree.mount.root / name
        if path in self.aliases:
            path.unlink(missing_ok=True)
            self.aliases.discard(path)
            return True
        if path not in self.linked:
            return True
        try:
            linker.unlink(self.linked[path])
        except linker.LinkError as e:
            log.warning("expiring %s: %s", path, e)
            return False
        del self.linked[path]
        with contextlib.suppress(OSError):
            path.rmdir()
        log.info("%s expired: unmounted, detached, unlinked", path)
        return True

    def _expire_loop(self) -> None:
        interval = max(0.5, self.timeout / 4)
        while not self.stopping.wait(interval):
            with self.mounts_lock:
                mounts = [subtree.mount for subtree in self.subtrees.values()]
            for mount in mounts:
                try:
                    while not self.stopping.is_set() and mount.expire_one():
                        pass
                except OSError as e:
                    log.warning("expire %s: %s", mount.root, e)

    # -- exit --

    def _clean_up(self) -> None:
        for path in list(self.aliases):
            with contextlib.suppress(OSError):
                path.unlink()
        self.aliases.clear()
        for path, link_id in list(self.linked.items()):
            try:
                linker.unlink(link_id)
            except linker.LinkError as e:
                log.error("leaving %s behind: %s", path, e)
                continue
            del self.linked[path]
            with contextlib.suppress(OSError):
                path.rmdir()
        for dev, subtree in list(self.subtrees.items()):
            try:
                subtree.mount.close()
            except OSError as e:
                log.error("leaving %s behind: %s", subtree.mount.root, e)
            del self.subtrees[dev]
            with contextlib.suppress(OSError):
                subtree.mount.root.rmdir()
        if self.top is not None:
            self.top.close()
            self.top = None
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None


def program_map_entry(key: str, server: str, tls_certificates: str | None = None,
                      requester: LocalUser | None = None, entry: str = "") -> str:
    """For the stock automount's program maps: link the disk `key` names for `requester` (the
    user whose lookup ran the map; automount passes its uid and gid as AUTOFS_UID and
    AUTOFS_GID) as that user, attach it, mount it where only that user can reach it
    (linker.user_mount_point) and return the entry that makes automount's name for the key a
    symlink there (`-fstype=bind,symlink :/run/minidisk/vmlink/1000/alice.0191`). The stock
    daemon's names are the same for every user and it asks us only for names not there yet,
    so for it we chose a refusal: another uid following the symlink gets EACCES from the
    kernel, until the symlink expires. `entry` (automount's path for the key) is kept, and a
    lookup by the same user after the symlink expired finds the link still there. The stock
    daemon has no unmount hook: `minidisk unlink --idle` (from a timer) ends the link once
    that symlink is gone and nothing under the mount is open."""
    parsed = parse_key(key)
    if parsed.partition is not None:
        raise linker.LinkError(errno.EINVAL, "program maps serve whole disks only")
    user = requester or LocalUser(os.getuid(), os.getgid())
    found = linker.resolve(key, server, tls_certificates, user)  # as the user: its grant
    existing = linker.load(f"{parsed.name}.uid{user.uid}")
    if existing is not None:
        alive = existing.keeper is not None and existing.keeper.alive()
        if alive and existing.mountpoint and kernel_mount.mounted_at(existing.mountpoint):
            return _symlink_entry(existing.mountpoint)
        linker.unlink(existing.id)  # the link was lost: start again
    mountpoint = linker.user_mount_point(user, parsed.name)
    state = linker.link(str(parsed), server, mountpoint=mountpoint,
                        mode=str(found.get("grant") or "R"),
                        tls_certificates=tls_certificates, on_behalf_of=linker.PROGRAM_MAP,
                        as_user=user, resolved=found, entry=entry)
    return _symlink_entry(state.mountpoint)


def _symlink_entry(path: str) -> str:
    return f"-fstype=bind,symlink :{path}"
