"""A governed disk is governed wherever its bytes appear, not only under its own key.

The link authority's export policy decides who opens the directory's disks by export name.
The same bytes can be reached by other names: a dm table mapping the governed key (or
mapping what the governed key maps), a second key over the same host file (another path, a
hard link, a window of it), a directory key holding it. Each would serve the governed bytes
to whoever may open ungoverned exports (every TLS user, root). So:

* **Refused where they are made.** The namespace asks `check_host` before registering a key
  over a host file, with the fstat of the descriptor it opened (no name is trusted), and the
  dm registry asks `check_table_child` for every device a table is about to map: a key or
  table over a governed device's bytes is refused with EACCES, and so is registering a
  governed key over bytes another key serves already.
* **Denied where they are opened**, for what the checks above never saw (a key made before
  the directory named the disk, a file below a directory key reached through a hard link):
  `policy` denies every export whose bytes are a governed disk's, except that disk's own
  export, which the authority's policy governs.

Bytes are compared as "leaves": every device object on the way down (through revocable,
sector and cache wrappers and dm tables, live and inactive), and the (st_dev, st_ino) of
every host file at the bottom. Two exports share bytes when their leaves meet; windows are
not compared (a window of a governed file is as governed as the file).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

from minidisk.device.api import BlockDevice
from minidisk.device.file import FileDevice
from minidisk.dm.mapped import MappedDevice
from minidisk.link.directory import Disk
from minidisk.namespace import NamespaceRow
from minidisk.namespace.keys import EtfsType, under_directory
from minidisk.nbd.exports import Access, Identity

# ("file", st_dev, st_ino) of a host file, or ("device", id(device), 0) of a device object
Leaf = tuple[str, int, int]


class Namespace(Protocol):
    """What governance reads of the namespace (minidisk.namespace.Namespace)."""

    def export_names(self) -> list[str]: ...

    def lookup(self, key: str) -> BlockDevice: ...

    def ls(self) -> list[NamespaceRow]: ...


class Tables(Protocol):
    """What governance reads of the dm registry: the devices, for their tables' identity."""

    devices: dict[str, MappedDevice]


def leaves(device: BlockDevice) -> tuple[set[Leaf], list[str]]:
    """The leaves of `device`, and the paths its host files were opened by (for messages
    and for directory keys, which can only be compared by path)."""
    found: set[Leaf] = set()
    paths: list[str] = []
    todo: list[object] = [device]
    while todo:
        d = todo.pop()
        leaf = ("device", id(d), 0)
        if leaf in found:
            continue
        found.add(leaf)
        if isinstance(d, MappedDevice):
            for mapping in (d.live, d.inactive):
                if mapping is not None:
                    todo += [ref.device for ref in mapping.devices()]
        if isinstance(d, FileDevice) and d.fd >= 0:
            st = os.fstat(d.fd)
            found.add(("file", st.st_dev, st.st_ino))
            paths.append(d.path)
        # The wrappers: revocable and sector (`inner`), cache windows and caches (`backing`).
        todo += [inner for name in ("inner", "backing")
                 if isinstance(inner := getattr(d, name, None), BlockDevice)]
    return found, paths


def file_leaf(st: os.stat_result) -> Leaf:
    return ("file", st.st_dev, st.st_ino)


class Governance:
    def __init__(self, governed: Callable[[], list[Disk]], namespace: Namespace,
                 tables: Tables) -> None:
        self.governed = governed  # the directory's disks (the authority's cached read)
        self.namespace = namespace
        self.tables = tables
        self._cache: tuple[object, dict[Leaf, set[str]], list[tuple[str, str]]] | None = None

    # -- what is governed --

    def _fingerprint(self, disks: list[Disk]) -> object:
        """Changes whenever a governed disk's leaves may have: the directory's disks, the
        keys, and every mapped device's live and inactive tables."""
        return (tuple(disk.key for disk in disks), tuple(self.namespace.export_names()),
                tuple((id(dev.live), id(dev.inactive)) for dev in self.tables.devices.values()))

    def _governed_leaves(self) -> tuple[dict[Leaf, set[str]], list[tuple[str, str]]]:
        """leaf -> names of the governed disks made of it; (host path, disk name) pairs."""
        disks = self.governed()
        fingerprint = self._fingerprint(disks)
        if self._cache is not None and self._cache[0] == fingerprint:
            return self._cache[1], self._cache[2]
        by_leaf: dict[Leaf, set[str]] = {}
        paths: list[tuple[str, str]] = []
        present = set(self.namespace.export_names())
        rows: list[NamespaceRow] | None = None
        for disk in disks:
            if disk.export in present:
                found, host_paths = leaves(self.namespace.lookup("/" + disk.export))
            else:  # not served here, or a file below a directory key, maybe not open now
                rows = self.namespace.ls() if rows is None else rows
                found, host_paths = _below_directory_key(disk.key, rows)
            for leaf in found:
                by_leaf.setdefault(leaf, set()).add(disk.name)
            paths += [(path, disk.name) for path in host_paths]
        self._cache = (fingerprint, by_leaf, paths)
        return by_leaf, paths

    def _disks_in(self, found: set[Leaf]) -> set[str]:
        by_leaf, _ = self._governed_leaves()
        return set().union(*(by_leaf.get(leaf, set()) for leaf in found))

    def _governing(self, key: str) -> Disk | None:
        export = key.lstrip("/")
        return next((disk for disk in self.governed() if disk.export == export), None)

    # -- refused where made --

    def check_host(self, key: str, st: os.stat_result, is_dir: bool) -> None:
        """Before `key` is registered over the host file (or directory) `st`."""
        self._cache = None  # registrations are rare: decide on what holds now
        if is_dir:
            _, paths = self._governed_leaves()
            for path, name in paths:
                if _below(path, st):
                    raise OSError(errno.EACCES, f"directory key {key} would hold {path}, the "
                                  f"host file of {name}, which the link directory governs")
            return
        leaf = file_leaf(st)
        disks = self._disks_in({leaf})
        if disks:
            raise OSError(errno.EACCES, f"key {key} would serve the host file of "
                          f"{', '.join(sorted(disks))}, which the link directory governs")
        disk = self._governing(key)
        if disk is not None:  # a governed key over bytes another key serves already
            for other in self._served_by_others(key):
                if leaf in other[1]:
                    raise OSError(errno.EACCES, f"key {key} ({disk.name}, governed by the "
                                  f"link directory) would share its host file with {other[0]}")

    def check_table_child(self, table_key: str, child_key: str, child: BlockDevice) -> None:
        """Before the table of `table_key` maps `child_key`."""
        self._cache = None
        found, _ = leaves(child)
        disks = self._disks_in(found)
        if disks:
            raise OSError(errno.EACCES, f"{table_key} cannot map {child_key}: it holds the "
                          f"bytes of {', '.join(sorted(disks))}, which the link directory "
                          "governs")

    def _served_by_others(self, key: str) -> Iterator[tuple[str, set[Leaf]]]:
        for name in self.namespace.export_names():
            if "/" + name != key:
                yield "/" + name, leaves(self.namespace.lookup("/" + name))[0]

    # -- denied where opened --

    def policy(self, identity: Identity, name: str) -> Access:
        """DENY for an export holding a governed disk's bytes under another name; anything
        else is for the other policies to decide."""
        key = "/" + name.lstrip("/")
        try:
            device = self.namespace.lookup(key)
        except OSError:
            return Access.READ_WRITE  # not opened here: nothing of anyone's to serve
        disks = self._disks_in(leaves(device)[0])
        if not disks:
            return Access.READ_WRITE
        own = self._governing(key)
        return Access.READ_WRITE if own is not None and disks == {own.name} else Access.DENY


def _below_directory_key(key: str, rows: list[NamespaceRow]) -> tuple[set[Leaf], list[str]]:
    """The host file a directory key would open as `key` (governed disks may live there),
    found by name without opening it; nothing if there is none."""
    for row in rows:
        rest = under_directory(row.key, key)
        if rest is None or row.hostpath is None or not (
                row.type == EtfsType.DIR_SUBDIRS.value
                or (row.type == EtfsType.DIR.value and "/" not in rest)):
            continue
        path = os.path.join(row.hostpath, rest)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            return {file_leaf(st)}, [path]
    return set(), []


def _below(path: str, directory: os.stat_result) -> bool:
    """Is the file at `path` inside the directory `directory` (by identity, any depth)?"""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) == (directory.st_dev, directory.st_ino):
            return True
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up
