"""The server side of linking: who may link, who holds a link now, and who may therefore
open a disk.

A daemon started with `--directory FILE` is the authority for the directory's disks it
serves. Its control channel gains three commands any authenticated peer may send (the
caller's identity is the one the NBD server proved: SO_PEERCRED uid or TLS subject):

    resolve {key}                    where a disk lives, and the caller's grant on it
    link {disk, mode, password?}     authorize, lock, record a live link tied to this connection
    renew {}                         renew the lease of the link made on this connection
    unlink {}                        end the link made on this same connection

A live link is bound to the control connection that made it: it ends when that connection
closes for any reason (clean unlink, the holder killed with -9, a lost network), or when its
holder has not renewed its lease for `lease` seconds (a host that vanished without closing
anything: the keeper renews every third of it). Then every data connection the link admitted
is hung up and waited for, and only then is the lock released.
The export policy admits an identity to a governed disk only while it holds a live link
(read links read-only); the owner always. Exports the directory does not name stay as they
were for network peers; on the unix socket (made 0666 so that every local user can link)
they are for administrators only.

Each link has its own lock-manager connection, named `vmlink MODE PRINCIPAL`, so the lock
dies with the link (and with this daemon), and so that a refused linker can be told which
mode of whose link is in the way — also for links made through other servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from minidisk.dlm import client as dlm_client
from minidisk.link.directory import Directory, DirectoryError, Disk
from minidisk.link.modes import (
    DEFAULT_MODE,
    FALLBACK_TEST,
    LinkMode,
    parse_link_mode,
)
from minidisk.link.names import DiskKey, parse_key, principal_of
from minidisk.link.ratelimit import RefusalLimiter
from minidisk.nbd.exports import Access, Identity

log = logging.getLogger(__name__)

LOCK_DOMAIN = "vmlink"
# How long an ended link waits for its data connections' requests in flight before it lets
# its lock go anyway (a request stuck in a device must not pin the disk for ever).
HANG_UP_WAIT = 10.0
# Seconds a link lives without a renewal (`link_lease` in the daemon's configuration).
DEFAULT_LEASE = 60.0
# The refusals that count against a principal's rate limit: wrong or missing passwords and
# grants, unknown disks and owners, bad keys -- what guessing and probing get. Conflicts
# with other links (EBUSY, EEXIST) are an authorized user's and do not count.
_PROBING = (errno.EACCES, errno.ENOENT, errno.EINVAL, errno.ENXIO)

T = TypeVar("T")


class Connections(Protocol):
    """What the authority needs from the NBD server that carries its control commands."""

    def connection_closed(self, identity: Identity) -> asyncio.Event | None:
        """Set when the connection whose identity object is `identity` has closed."""

    def hang_up(self, wanted: Callable[[Identity, str, bool], bool]) -> list[asyncio.Event]:
        """End every data connection for which wanted(identity, export name, writable) is
        true; their events are set once each has closed."""


class KeyedLocks:
    """One asyncio lock per name, existing only while someone holds or waits for it (names
    come from requests: an idle name must cost nothing)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name) or (asyncio.Lock(), 0)
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


class LinkConflict(OSError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


@dataclass(eq=False)
class LiveLink:
    principal: str
    disk: Disk
    mode: LinkMode
    writes: bool  # False for read modes and for a degraded WR/MR
    degraded: bool
    why: str
    identity: Identity  # the exact object of the control connection that made it
    since: float = field(default_factory=time.time)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = ""
    # Set once the link's data connections are gone: only then is its lock let go.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    expires: float = 0.0  # monotonic time by which the holder must renew it
    holding: asyncio.Task[None] | None = None  # the task that holds its lock

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    def describe(self) -> dict[str, Any]:
        return {"disk": self.disk.name, "export": self.disk.export, "mode": self.mode.name,
                "access": "read-write" if self.writes else "read-only",
                "degraded": self.degraded, "why": self.why, "principal": self.principal,
                "since": self.since}


class LinkAuthority:
    def __init__(self, directory: Directory, dlm_url: str | None, connections: Connections,
                 has_export: Callable[[str], bool], is_admin: Callable[[Identity], bool],
                 lease: float = DEFAULT_LEASE) -> None:
        self.directory = directory
        self.lease = lease
        self.is_admin = is_admin
        self.dlm_url = dlm_url
        self.connections = connections
        self.has_export = has_export
        self.links: list[LiveLink] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.admission = KeyedLocks()
        self.limiter = RefusalLimiter()
        # scrypt (~50 ms a check) and SQLite writes (an fsync each) must not stop the loop
        # that serves every client's data: they run on one thread with its own connection.
        # The loop keeps `directory` for the export policy's reads (cached, see _governing).
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="link-directory")
        self.worker_directory = Directory(directory.path, check_same_thread=False)
        self._governed: dict[str, Disk] = {}
        self._governed_version: int | None = None

    # -- the export policy --

    def policy(self, identity: Identity, export: str) -> Access:
        disk = self._governing(export)
        if disk is None:
            # Not the directory's: as before the link layer for network peers; on the unix
            # socket, which is now open to every local user, administrators only.
            if identity.uid is None or self.is_admin(identity):
                return Access.READ_WRITE
            return Access.DENY
        principal = principal_of(identity)
        if principal is None:
            return Access.DENY
        if principal == disk.owner_principal:
            return Access.READ_WRITE
        access = Access.DENY
        for link in self.links:
            # An ended link admits nothing, also while it waits for its turn to be taken out.
            if link.principal == principal and link.disk.name == disk.name \
                    and not link.ended.is_set():
                if link.writes:
                    return Access.READ_WRITE
                access = Access.READ_ONLY
        return access

    def _governing(self, export: str) -> Disk | None:
        """The directory's disk served as `export`."""
        self.disks()
        return self._governed.get(export.lstrip("/"))

    def disks(self) -> list[Disk]:
        """The directory's disks. The policy asks for every export of every LIST, INFO and
        GO: they are read again only when the file changed."""
        version = self.directory.data_version()
        if version != self._governed_version:
            self._governed = {disk.export: disk for disk in self.directory.disks()}
            self._governed_version = version
        return list(self._governed.values())

    # -- control commands --

    def control_handlers(self) -> dict[str, Callable[..., Any]]:
        return {"resolve": self.resolve, "link": self.link, "renew": self.renew,
                "unlink": self.unlink, "links": self.list_links}

    async def resolve(self, args: dict[str, Any], identity: Identity) -> dict[str, Any]:
        principal = self._principal(identity)
        self.limiter.check(principal)
        raw = str(args.get("key", ""))
        try:
            key = parse_key(raw)
        except ValueError as e:
            await self._refused(principal, "resolve", raw[:300], "", str(e), args)
            raise OSError(errno.ENOENT, str(e)) from None
        try:
            disk, granted = await self._in_worker(self._look_up, principal, key)
        except OSError as e:
            await self._refused(principal, "resolve", str(key), "", str(e.strerror), args)
            raise
        return {"disk": disk.name, "partition": key.partition, "server": disk.server,
                "export": disk.export, "owner": principal == disk.owner_principal,
                "grant": granted.name if granted else None}

    def _look_up(self, principal: str, key: DiskKey) -> tuple[Disk, LinkMode | None]:
        """In the worker: the disk `key` names and `principal`'s grant on it."""
        d = self.worker_directory
        disk = d.disk(key)
        if disk is None:
            raise OSError(errno.ENOENT, f"no disk {key.name} in the directory"
                          if d.owner_exists(key.owner) else f"no owner {key.owner!r}")
        return disk, d.granted_mode(principal, key)

    async def link(self, args: dict[str, Any], identity: Identity) -> dict[str, Any]:
        principal = self._principal(identity)
        self.limiter.check(principal)
        raw_key = str(args.get("disk", ""))
        mode_text = str(args.get("mode") or DEFAULT_MODE)
        try:
            key = parse_key(raw_key, partition=False)
            mode = parse_link_mode(mode_text)
        except ValueError as e:
            await self._refused(principal, "link", raw_key[:300], mode_text[:8], str(e), args)
            raise OSError(errno.EINVAL, str(e)) from None
        try:
            # One decision at a time per disk: authorize, the one-link-per-principal check,
            # the lock and the registration, with nothing of another link's in between.
            async with self.admission.hold(key.name):
                link = await self._link(principal, key, mode, args, identity)
        except OSError as e:
            await self._refused(principal, "link", key.name, mode.name, str(e.strerror), args,
                                counted=e.errno in _PROBING)
            raise
        self.limiter.admitted(principal)
        outcome = "degraded to read-only" if link.degraded else "linked"
        await self._audit(principal, "link", link.disk.name, mode.name, outcome, link.why, args)
        log.info("%s linked %s %s (%s)", principal, link.disk.name, mode.name, outcome)
        return {**link.describe(), "lease": self.lease}

    async def _link(self, principal: str, key: DiskKey, mode: LinkMode, args: dict[str, Any],
                    identity: Identity) -> LiveLink:
        password = args.get("password")
        disk, why = await self._in_worker(self._authorize, principal, key, mode,
                                          password if isinstance(password, str) else None)
        if not self.has_export(disk.key):
            raise OSError(errno.ENXIO, f"{disk.name} is held by {disk.server}, not here")
        for other in self.links:
            if other.principal == principal and other.disk.name == disk.name:
                raise OSError(errno.EEXIST, f"{disk.name} is already linked by "
                              f"{principal} in mode {other.mode.name}; unlink it first")
        closed = self.connections.connection_closed(identity)
        if closed is None:
            raise OSError(errno.ENOTCONN, "the linking connection is gone")
        link = LiveLink(principal, disk, mode, mode.writes, False, why, identity)
        link.degraded = await self._admit(link)
        link.writes = mode.writes and not link.degraded
        link.expires = time.monotonic() + self.lease
        self.links.append(link)
        self._spawn(self._watch(link, closed))
        return link

    async def renew(self, args: dict[str, Any], identity: Identity) -> dict[str, Any]:
        """Push back the end of the lease of the link made on this connection."""
        for link in self.links:
            if link.identity is identity and not link.ended.is_set():
                link.expires = time.monotonic() + self.lease
                return {"disk": link.disk.name, "lease": self.lease}
        raise OSError(errno.ENOENT, "no live link was made on this connection (it ended: "
                      "unlinked, lease expired or lock manager lost)")

    async def unlink(self, args: dict[str, Any], identity: Identity) -> dict[str, Any]:
        """End the link made on this connection (the keeper's clean way out)."""
        for link in self.links:
            if link.identity is identity:
                link.end("unlink")
                return {"disk": link.disk.name}
        raise OSError(errno.ENOENT, "no link was made on this connection")

    async def list_links(self, args: dict[str, Any], identity: Identity) -> dict[str, Any]:
        principal = self._principal(identity)
        return {"links": [link.describe() for link in self.links
                          if link.principal == principal]}

    def _principal(self, identity: Identity) -> str:
        principal = principal_of(identity)
        if principal is None:
            raise OSError(errno.EACCES, "an anonymous peer cannot link: use a unix socket or "
                          "a TLS client certificate")
        return principal

    def _authorize(self, principal: str, key: DiskKey, mode: LinkMode,
                   password: str | None) -> tuple[Disk, str]:
        """In the worker: the disk, and why `principal` may link it in `mode`."""
        disk = self.worker_directory.disk(key)
        if disk is None:
            raise DirectoryError(errno.ENOENT, f"no disk {key.name} in the directory")
        return disk, self.worker_directory.authorize(principal, disk, mode, password)

    async def _in_worker(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.worker, functools.partial(call, *args))

    # -- locking --

    async def _admit(self, link: LiveLink) -> bool:
        """Take the link's lock as §2.3 says; True when WR/MR fell back to a read link.
        Never waits for other links: LinkConflict names the one in the way."""
        admitted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        link.holding = self._spawn(self._hold(link, admitted))
        return await admitted

    async def _hold(self, link: LiveLink, admitted: asyncio.Future[bool]) -> None:
        mode = link.mode
        try:
            async with dlm_client.connect(
                    self.dlm_url, name=f"vmlink {mode.name} {link.principal}") as dlm:
                dlm.on_lost = lambda: link.end("the lock manager connection was lost")
                lock = dlm.lock(LOCK_DOMAIN, link.disk.name, mode.test)
                if await lock.acquire(blocking=False):
                    await lock.convert(mode.held)  # down: granted at once
                    admitted.set_result(False)
                elif mode.fallback and await lock.acquire(blocking=False, mode=FALLBACK_TEST):
                    admitted.set_result(True)
                else:
                    holders = await _holders(dlm, link.disk.name)
                    admitted.set_exception(LinkConflict(
                        f"{link.disk.name} cannot be linked {mode.name}: it is linked "
                        f"{', '.join(holders) or 'by someone'}"))
                    return
                await link.released.wait()
        except Exception as e:  # the lock manager is down or refused us
            if not admitted.done():
                admitted.set_exception(OSError(errno.EAGAIN, f"lock manager: {e}"))
            else:
                log.error("link %s of %s: %s", link.disk.name, link.principal, e)
            link.end(f"lock manager: {e}")

    async def _watch(self, link: LiveLink, closed: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(closed.wait()), asyncio.ensure_future(link.ended.wait())]
        try:
            while not (closed.is_set() or link.ended.is_set()):
                left = link.expires - time.monotonic()
                if left <= 0:
                    link.end(f"its lease of {self.lease:g} s expired (not renewed)")
                    break
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            link.end("the holder's connection closed")
            await self._end(link)

    async def _end(self, link: LiveLink) -> None:
        """Take an ended link out, as one step for the disk's admission: no new data
        connection is admitted by it, those it admitted are hung up and waited for, and only
        then is its lock released -- so nobody links beside a write still in flight."""
        async with self.admission.hold(link.disk.name):
            self.links.remove(link)
            closing = self._hang_up(link)
            if closing:
                _, late = await asyncio.wait([asyncio.ensure_future(c.wait()) for c in closing],
                                             timeout=HANG_UP_WAIT)
                for waiter in late:
                    waiter.cancel()
                if late:
                    log.warning("link %s of %s: %d data connection(s) still busy after %g s",
                                link.disk.name, link.principal, len(late), HANG_UP_WAIT)
            link.released.set()
            if link.holding is not None:
                await asyncio.wait([link.holding], timeout=HANG_UP_WAIT)
        await self._audit(link.principal, "unlink", link.disk.name, link.mode.name,
                          "unlinked", link.end_reason, {})
        log.info("%s unlinked %s: %s", link.principal, link.disk.name, link.end_reason)

    def _hang_up(self, link: LiveLink) -> list[asyncio.Event]:
        """The data connections `link` admitted: this principal's to this disk, which no live
        link of it (nor ownership) admits any more, or which write and may now only read."""
        export = link.disk.export

        def wanted(identity: Identity, name: str, writable: bool) -> bool:
            if name.lstrip("/") != export or principal_of(identity) != link.principal:
                return False
            access = self.policy(identity, name)
            return access is Access.DENY or (writable and access is not Access.READ_WRITE)

        return self.connections.hang_up(wanted)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _refused(self, principal: str, action: str, disk: str, mode: str, why: str,
                       args: dict[str, Any], counted: bool = True) -> None:
        """Audit a refusal; `counted` ones (what guessing and probing get) count against the
        principal's rate limit, whose notes go into the row; an uncounted one repeated at
        once is only counted into the next row (RefusalLimiter.refused)."""
        note = self.limiter.refused(principal, counted, f"{action} {disk} {mode}: {why}")
        if note is not None:  # as rate-limited as the audit rows: a flood is not logged whole
            log.warning("%s refused to %s: %r %s: %s%s", action, principal, disk, mode, why,
                        f" ({note})" if note else "")
            await self._audit(principal, action, disk, mode, "refused",
                              f"{why} ({note})" if note else why, args)

    async def _audit(self, who: str, action: str, disk: str, mode: str, outcome: str, why: str,
                     args: dict[str, Any]) -> None:
        if args.get("on_behalf_of") is not None:
            why = f"{why} (for {str(args['on_behalf_of'])[:64]})"
        try:
            await self._in_worker(self.worker_directory.audit, who, action, disk, mode,
                                  outcome, why)
        except Exception:
            log.exception("could not write the audit log")

    async def aclose(self) -> None:
        """End every link (the daemon is stopping) and wait until their locks are gone."""
        for link in list(self.links):
            link.end("the server stopped")
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=10)
        with contextlib.suppress(Exception):
            await self._in_worker(self.worker_directory.close)
        self.worker.shutdown(wait=False)


async def _holders(dlm: dlm_client.DlmClient, resource: str) -> list[str]:
    """`W by uid:0`, … for every granted lock on `resource` (from the owners' names)."""
    found = []
    with contextlib.suppress(Exception):
        status = await dlm.status()
        for domain in status["domains"]:
            if domain["name"] != LOCK_DOMAIN:
                continue
            for res in domain["resources"]:
                if res["name"] != resource:
                    continue
                for lock in res["granted"]:
                    owner = str(lock["owner"] or "")
                    words = owner.rsplit("[", 1)[0].split(" ", 2)
                    if len(words) == 3 and words[0] == "vmlink":
                        found.append(f"{words[1]} by {words[2]}")
                    else:
                        found.append(f"by {owner} ({lock['grmode']})")
    return found
