"""The namespace: keys → devices. The NBD server exports it; dm tables reference it.

Keys follow rump_etfs (see keys.py). A key maps to a window of a host file (`reg`, `blk`,
`chr`), to a host directory whose regular files appear below the key on demand (`dir`: the
immediate children, `dir_subdirs`: the whole tree), or to any `BlockDevice` registered as is
(memory disks, dm mapped devices).

**In use, and removal.** NetBSD's rump_etfs_remove has no in-use check at all: it revokes the
vnodes and returns 0 (and older DIAGNOSTIC kernels panic). We define it instead:

* A key is *in use* while it has references: one per NBD connection (`open_export`) and one per
  dm table that maps it (`hold`). A directory key is in use while any file below it is.
* `remove(key)` of a key in use is EBUSY, and changes nothing. That is the safe default, it is
  what the rump_etfs man page promises, and it is what dmsetup does for an open device.
* `remove(key, force=True)` takes the key out of the namespace at once (it may be registered
  again immediately) and revokes the device: later requests of its users fail with ESHUTDOWN,
  and requests in flight fail with ESHUTDOWN when they come back from the host file (see
  revocable.py for why they are not abandoned). The device is then closed: a `blk` cache writes
  back what it holds, so data acknowledged before the removal is not lost. Other keys and their
  connections never notice. Users keep their references, which then do nothing on close.

Each registration gets its own device and window, even for the same host file (NetBSD reuses
the first registration's minor and window, a bug we do not copy); `blk` keys over one file
share its one block cache, though (hostdev.py), so that they never see or write back each
other's stale lines.

Directory keys are not exports of their own and are not listed by `export_names` (rump_etfs
keys never show in readdir either); the files below them are opened on demand, by descriptor
below the directory descriptor the key took at registration (hostpath.py). The default
export (the empty NBD name) is the first-registered key that is not a directory.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from minidisk.device.api import BlockDevice
from minidisk.device.revocable import Revocable, revocable
from minidisk.namespace.blockcache import DEFAULT_CACHE_LIMIT, CacheMemory
from minidisk.namespace.hostdev import HostFiles, open_host, open_host_device
from minidisk.namespace.hostpath import open_directory, open_regular_below
from minidisk.namespace.keys import (
    RUMP_ETFS_SIZE_ENDOFF,
    EtfsType,
    canonical_key,
    export_name,
    under_directory,
)

DEVICE_TYPE = "device"  # the type column of a key registered with register_device


@dataclass(eq=False)
class Entry:
    key: str
    type: str  # an EtfsType value or DEVICE_TYPE
    device: Revocable | None  # None for directory keys
    description: str
    hostpath: str | None = None
    dirfd: int | None = None  # a directory key's O_PATH descriptor: files resolve below it
    begin: int = 0
    users: int = 0
    parent: Entry | None = None  # the directory key a file below it was found under
    children: dict[str, Entry] = field(default_factory=dict)  # live files below a directory
    removed: bool = False


@dataclass(frozen=True)
class NamespaceRow:
    """One line of `minidisk etfs ls`."""

    key: str
    type: str
    hostpath: str | None
    begin: int
    size: int | None  # None for directory keys
    users: int
    description: str


class Reference:
    """A counted use of a key: one per NBD connection, one per dm table mapping it."""

    def __init__(self, namespace: Namespace, entry: Entry) -> None:
        assert entry.device is not None
        self.device: BlockDevice = entry.device
        self.key = entry.key
        self.name = export_name(entry.key)
        self.description = entry.description
        self._namespace = namespace
        self._entry: Entry | None = entry
        entry.users += 1

    def close(self) -> None:
        """Drop the use. Idempotent; after a forced removal it does nothing else."""
        entry, self._entry = self._entry, None
        if entry is not None:
            self._namespace._unuse(entry)

    release = close


OpenedExport = Reference  # the NBD server's name for a connection's reference


# Every key has a device number, as a block device has, for dm tables and dmsetup, which
# name devices by MAJOR:MINOR (the kernel prints a table's devices so; `deps`, `ls --tree`
# show them so). The major is the first of Linux's "local/experimental use" range
# (Documentation/admin-guide/devices.txt: 240-254); a key's minor is the lowest one free when
# it is registered, kept while it lives (renames included) and free again once it is removed.
KEY_MAJOR = 240


class Namespace:
    def __init__(self, cache_limit: int = DEFAULT_CACHE_LIMIT) -> None:
        self._minors: dict[str, int] = {}  # top-level key -> minor (see KEY_MAJOR)
        self.cache_memory = CacheMemory(cache_limit)
        self.host_files = HostFiles(self.cache_memory)  # blk caches, uncached windows
        self._entries: dict[str, Entry] = {}  # in registration order
        self._closing: set[asyncio.Task[None]] = set()
        self._unused_listeners: list[Callable[[str], None]] = []
        # Asked before a key over a host file (or directory) is registered, with the fstat of
        # the descriptor opened for it; raising refuses the key (the link layer: no second
        # key over a governed disk's file, minidisk.link.governance).
        self.host_checks: list[Callable[[str, os.stat_result, bool], None]] = []

    # Registration.

    def register(self, key: str, hostpath: str, type: str | EtfsType = EtfsType.BLK,
                 begin: int = 0, size: int = RUMP_ETFS_SIZE_ENDOFF,
                 follow_symlinks: bool = False, fd: int | None = None) -> str:
        """rump_etfs_register_withsize: map `key` to a window of `hostpath`; returns the key.

        The host path is opened once, by descriptor, with symbolic links refused unless
        `follow_symlinks` (hostpath.py); `fd`, when given, is that file already open (it is
        duplicated, not taken over: drivespec.apply opened it to create or grow it)."""
        etfs_type = EtfsType.parse(type)
        key = canonical_key(key)
        hostpath = os.path.abspath(hostpath)  # a later chdir (daemonizing) must not move it
        self.check_free(key, etfs_type.is_dir)
        if etfs_type.is_dir:
            if begin != 0 or size != RUMP_ETFS_SIZE_ENDOFF:
                raise OSError(errno.EISDIR, "a directory key takes no window")
            try:
                dirfd = open_directory(hostpath, follow_symlinks)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                raise OSError(errno.ENOTDIR, f"{hostpath} is not a directory") from None
            self._check_host(key, dirfd, True)
            entry = Entry(key, etfs_type.value, None, f"{etfs_type.value} {hostpath}",
                          hostpath=hostpath, dirfd=dirfd)
        else:
            fd = open_host(hostpath, follow_symlinks) if fd is None else os.dup(fd)
            self._check_host(key, fd, False)
            device = open_host_device(fd, hostpath, etfs_type, begin, size, self.host_files)
            entry = Entry(key, etfs_type.value, revocable(device),
                          f"{etfs_type.value} {hostpath} [{begin}, +{device.size}]",
                          hostpath=hostpath, begin=begin)
        self._entries[key] = entry
        self._number(key)
        return key

    def _number(self, key: str) -> None:
        used = set(self._minors.values())
        self._minors[key] = next(m for m in range(len(used) + 1) if m not in used)

    def devno(self, key: str) -> tuple[int, int] | None:
        """The key's device number (KEY_MAJOR, minor); None for a file found below a
        directory key (numbered only where registered)."""
        minor = self._minors.get(canonical_key(key))
        return None if minor is None else (KEY_MAJOR, minor)

    def key_of_devno(self, major: int, minor: int) -> str:
        """The key with this number; ENOENT if none has it."""
        if major == KEY_MAJOR:
            for key, number in self._minors.items():
                if number == minor:
                    return key
        raise OSError(errno.ENOENT, f"no key has device number {major}:{minor}")

    def _check_host(self, key: str, fd: int, is_dir: bool) -> None:
        """Run the host checks; a refusal closes `fd` (nothing else was made yet)."""
        try:
            st = os.fstat(fd)
            for check in self.host_checks:
                check(key, st, is_dir)
        except BaseException:
            os.close(fd)
            raise

    def register_device(self, key: str, device: BlockDevice, description: str | None = None) -> str:
        """Map `key` to an already-built device, which the namespace now owns (closes)."""
        key = canonical_key(key)
        self.check_free(key, False)
        self._entries[key] = Entry(key, DEVICE_TYPE, revocable(device),
                                   description or device.describe())
        self._number(key)
        return key

    def check_free(self, key: str, is_dir: bool = False) -> None:
        """EEXIST unless the canonical `key` could be registered now."""
        if key in self._entries:
            raise OSError(errno.EEXIST, f"key {key} is already registered")
        for other in self._entries.values():
            if other.type in _DIR_TYPES and under_directory(other.key, key) is not None:
                raise OSError(errno.EEXIST, f"key {key} lies under directory key {other.key}")
            if is_dir and under_directory(key, other.key) is not None:
                raise OSError(errno.EEXIST, f"directory key {key} would cover key {other.key}")

    async def remove(self, key: str, force: bool = False) -> None:
        """rump_etfs_remove, with EBUSY for a key in use unless `force` (module docstring)."""
        key = canonical_key(key)
        entry = self._entries.get(key)
        if entry is None:
            raise OSError(errno.ENOENT, f"key {key} is not registered")
        users = entry.users + sum(child.users for child in entry.children.values())
        if users and not force:
            raise OSError(errno.EBUSY, f"key {key} is in use ({users} references)")
        del self._entries[key]
        self._minors.pop(key, None)
        await self._close_entry(entry)

    def rekey(self, key: str, new_key: str, description: str | None = None) -> str:
        """Move a device key's device to `new_key` without closing it (dmsetup rename): EBUSY
        while it has users (clients name it by key), ENOENT, EEXIST as for registration."""
        key, new_key = canonical_key(key), canonical_key(new_key)
        entry = self._entries.get(key)
        if entry is None:
            raise OSError(errno.ENOENT, f"key {key} is not registered")
        if entry.type != DEVICE_TYPE:
            raise OSError(errno.EINVAL, f"key {key} is a host-file key; only device keys move")
        if entry.users:
            raise OSError(errno.EBUSY, f"key {key} is in use ({entry.users} references)")
        self.check_free(new_key)
        del self._entries[key]
        entry.key = new_key
        if description is not None:
            entry.description = description
        self._entries[new_key] = entry
        if key in self._minors:
            self._minors[new_key] = self._minors.pop(key)
        return new_key

    async def _close_entry(self, entry: Entry) -> None:
        entries = [entry, *entry.children.values()]
        entry.children.clear()
        devices = [e.device for e in entries if e.device is not None]
        for e in entries:
            e.removed = True
            if e.dirfd is not None:
                os.close(e.dirfd)
                e.dirfd = None
        for device in devices:  # all revoked before the first await: one atomic step
            device.revoke()
        errors = []
        for device in devices:
            try:
                await device.close()
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # Lookup and use.

    def lookup(self, key: str) -> BlockDevice:
        """The device at `key` (files below directory keys are opened on demand), uncounted."""
        device = self._resolve(canonical_key(key)).device
        assert device is not None
        return device

    def hold(self, key: str) -> Reference:
        """A counted reference, for a dm table that maps `key`; `release()` it when done."""
        return Reference(self, self._resolve(canonical_key(key)))

    def users(self, key: str) -> int:
        """How many references (NBD connections, dm tables) hold `key` now; 0 if none or
        if there is no such key."""
        entry = self._entries.get(canonical_key(key))
        return entry.users if entry is not None else 0

    def on_unused(self, listener: Callable[[str], None]) -> None:
        """Call `listener(key)` whenever the last reference to a key is let go: how dm
        learns that a device marked for deferred removal has lost its last NBD client."""
        self._unused_listeners.append(listener)

    def export_names(self) -> list[str]:
        """Export names (keys without the leading slash) for NBD_OPT_LIST."""
        return [export_name(e.key) for e in self._entries.values() if e.device is not None]

    def open_export(self, name: str) -> Reference:
        """The reference for one NBD connection; "" (or only slashes) is the default export."""
        stripped = name.lstrip("/")
        if not stripped:
            for entry in self._entries.values():
                if entry.device is not None:
                    return Reference(self, entry)
            raise OSError(errno.ENOENT, "no default export: the namespace is empty")
        try:
            return Reference(self, self._resolve(canonical_key("/" + stripped)))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.EISDIR):
                raise OSError(errno.ENOENT, f"no export {name!r}: {e.strerror}") from None
            raise

    def ls(self) -> list[NamespaceRow]:
        rows = []
        for entry in self._entries.values():
            for e in (entry, *entry.children.values()):
                rows.append(NamespaceRow(
                    e.key, e.type, e.hostpath, e.begin,
                    e.device.size if e.device is not None else None,
                    e.users, e.device.describe() if e.device is not None else e.description))
        return rows

    def _resolve(self, key: str) -> Entry:
        entry = self._entries.get(key)
        if entry is not None:
            if entry.device is None:
                raise OSError(errno.EISDIR, f"{key} is a directory key")
            return entry
        for directory in self._entries.values():
            if directory.type in _DIR_TYPES:
                below = under_directory(directory.key, key)
                if below is not None:
                    return directory.children.get(key) or self._open_below(directory, below, key)
        raise OSError(errno.ENOENT, f"key {key} is not registered")

    def _open_below(self, directory: Entry, below: str, key: str) -> Entry:
        """The entry for the regular file `below` (a relative path) of a directory key."""
        assert directory.hostpath is not None and directory.dirfd is not None
        parts = below.split("/")
        if ".." in parts:
            raise OSError(errno.EOPNOTSUPP, f"{key}: '..' is not looked up (as in rump_etfs)")
        if "" in parts or "." in parts:  # one key per file: "a//b" and "a/./b" are not it
            raise OSError(errno.ENOENT, f"{key}: empty or '.' path component")
        if directory.type == EtfsType.DIR.value and len(parts) > 1:
            raise OSError(errno.ENOENT, f"{key}: a dir key shows only its immediate children")
        # By descriptor, below the key's own: a symbolic link anywhere could lead out of the
        # directory, and a name checked first could be swapped for one before the open.
        try:
            fd = open_regular_below(directory.dirfd, parts)
        except OSError as e:
            if e.errno not in _NOT_A_REGULAR_FILE:
                raise
            raise OSError(errno.ENOENT, f"{key}: no such regular file (symbolic links are "
                                        "not followed)") from None
        path = os.path.join(directory.hostpath, *parts)
        device = self.host_files.uncached(fd, path, 0, RUMP_ETFS_SIZE_ENDOFF)
        entry = Entry(key, EtfsType.REG.value, revocable(device),
                      f"reg {path} (below {directory.key})", hostpath=path, parent=directory)
        directory.children[key] = entry
        return entry

    def _unuse(self, entry: Entry) -> None:
        entry.users -= 1
        if not entry.users:
            for listener in self._unused_listeners:
                listener(entry.key)
        parent = entry.parent
        if entry.users or parent is None or entry.removed:
            return
        # The last user of a file below a directory key is gone: close it, in the background
        # when a loop runs (Reference.close is synchronous), and forget it either way.
        del parent.children[entry.key]
        entry.removed = True
        assert entry.device is not None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(entry.device.close())
            return
        task = loop.create_task(entry.device.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # Shutdown.

    async def sync(self, skip: Callable[[BlockDevice], bool] | None = None) -> None:
        """Write back every cache and flush every writable host file (halt's first step).
        Devices `skip` names are not flushed: a suspended dm device would hold the flush
        until a resume that, at halt, never comes (its own children are flushed here as
        their own keys)."""
        failed = []
        for entry in list(self._entries.values()):
            for e in (entry, *entry.children.values()):
                device = e.device
                if device is not None and device.caps.flush and not device.revoked \
                        and not (skip is not None and skip(device)):
                    try:
                        await device.flush()
                    except OSError as err:  # one dead device must not keep the rest unsynced
                        failed.append(f"{e.key}: {err.strerror or err}")
        if failed:
            raise OSError(errno.EIO, "not flushed: " + "; ".join(failed))

    async def aclose(self, skip: Callable[[BlockDevice], bool] | None = None) -> None:
        """Flush (see `sync`) and close every device and forget every key (halt). A flush
        that fails is reported after everything is closed, not instead of closing."""
        errors: list[OSError] = []
        try:
            await self.sync(skip)
        except OSError as e:
            errors.append(e)
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            try:
                await self._close_entry(entry)
            except OSError as e:
                errors.append(e)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if errors:
            raise errors[0]


_DIR_TYPES = (EtfsType.DIR.value, EtfsType.DIR_SUBDIRS.value)
# How opening a file below a directory key says "there is no regular file by that name":
# missing, a symbolic link (ELOOP, ENOTDIR, EXDEV), a directory, a socket, a FIFO or device.
_NOT_A_REGULAR_FILE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EXDEV, errno.EISDIR,
                       errno.ENXIO)
