"""Drivespecs: rump_server's `-d key=…,hostpath=…,size=…` grammar, parsed and applied.

Grammar (comma-separated ``token=value``; a value cannot contain a comma, as with getsubopt)::

    key=/KEY           required; rump_etfs key rules (keys.py)
    hostpath=PATH      required; relative to the current directory
    size=SIZE|host     bytes with strsuftoll suffixes (sizes.py); `host`: the existing file's size
    offset=SIZE        where the window begins in the host file (default 0)
    disklabel=LETTER   the window is BSD disklabel partition a…v of the file's first 64 KiB
    partition=N        (our extension) the window is MBR or GPT partition N (1-based; 5+ logical)
    type=blk|chr|reg   default blk; our extension: dir, dir_subdirs
    symlinks=follow    (our extension) follow symbolic links in hostpath; they are refused

Rules, rump_server's with its edge cases fixed: every token at most once (``size=0`` may not
repeat either); key and hostpath required; size, disklabel or partition required except for
type=reg (which then runs to the end of the file) and the directory types (which take none of
them); disklabel and partition must each be used alone (not with size, offset or each other) and
size=host not with offset — all checked whatever the order.

`apply` then does what rump_server does before registering: a missing hostpath is created with
mode 0644 & ~umask, and a regular file shorter than offset+size is extended sparsely
(ftruncate) before the key appears (an explicit size only: a partition past the end of its
image is an error, not a reason to grow it). A file it created is removed, and a file it grew
is cut back, when any later step fails, so an error leaves nothing behind. Every error is a
`DrivespecError`, one line that names the offending token and value.

It does all this as root, so the host file is opened once, by descriptor (hostpath.py), and
everything after works on that descriptor: a symbolic link anywhere in hostpath is refused
(unless symlinks=follow), a file is created only with O_EXCL, the descriptor is grown with
ftruncate and registered as it is, and the undo removes or cuts back only the very file
(st_dev, st_ino) it created or grew. A link planted in the path cannot make it create, grow,
truncate or export a file elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace

from minidisk.device.file import host_size
from minidisk.namespace.hostpath import HostPathError, open_host_file, unlink_host_file
from minidisk.namespace.keys import RUMP_ETFS_SIZE_ENDOFF, EtfsType, canonical_key
from minidisk.namespace.partitions import (
    LABEL_PARTITION_LETTERS,
    Partition,
    disklabel_partition,
    numbered_partition,
)
from minidisk.namespace.registry import Namespace
from minidisk.namespace.sizes import MAX_SIZE, SizeError, parse_size

TOKENS = ("key", "hostpath", "size", "offset", "disklabel", "partition", "type", "symlinks")
SYMLINK_POLICIES = ("follow", "refuse")
DRIVESPEC_TYPES = ("blk", "chr", "reg", "dir", "dir_subdirs")
MAX_PARTITION_NUMBER = 1 << 16


class DrivespecError(ValueError):
    """A drivespec that cannot be parsed or applied: `token=value: reason`, on one line."""

    def __init__(self, token: str, value: str | None, reason: str,
                 code: int | None = errno.EINVAL) -> None:
        self.token = token
        self.value = value
        self.reason = reason
        self.errno = code or errno.EINVAL
        where = token if value is None else f"{token}={value}"
        super().__init__(f"{where}: {reason}".replace("\n", " "))


@dataclass(frozen=True)
class Drivespec:
    key: str  # canonical
    hostpath: str
    type: EtfsType = EtfsType.BLK
    size: int | None = None  # None: from the host file, the table, or to the end (reg)
    size_from_host: bool = False
    offset: int = 0
    disklabel: str | None = None
    partition: int | None = None
    follow_symlinks: bool = False

    def format(self) -> str:
        """The drivespec text that `parse` reads back as this spec."""
        parts = [f"key={self.key}", f"hostpath={self.hostpath}", f"type={self.type.value}"]
        if self.size_from_host:
            parts.append("size=host")
        elif self.size is not None:
            parts.append(f"size={self.size}")
        if self.offset:
            parts.append(f"offset={self.offset}")
        if self.disklabel is not None:
            parts.append(f"disklabel={self.disklabel}")
        if self.partition is not None:
            parts.append(f"partition={self.partition}")
        if self.follow_symlinks:
            parts.append("symlinks=follow")
        return ",".join(parts)


def parse(text: str) -> Drivespec:
    """Parse one drivespec (grammar in the module docstring)."""
    given: dict[str, str] = {}
    for token in text.split(","):
        name, has_value, value = token.partition("=")
        if name not in TOKENS:
            raise DrivespecError(name, value if has_value else None,
                                 f"invalid drivespec token (expected {', '.join(TOKENS)})")
        if name in given:
            raise DrivespecError(name, value if has_value else None,
                                 f"{name} already given ({name}={given[name]})")
        if not has_value or not value:
            raise DrivespecError(name, None, "needs a value")
        given[name] = value
    for required in ("key", "hostpath"):
        if required not in given:
            raise DrivespecError(required, None, f"missing: {required}=… is required")

    try:
        key = canonical_key(given["key"])
    except OSError as e:
        raise DrivespecError("key", given["key"], e.strerror or "invalid key") from None
    type_text = given.get("type", "blk")
    if type_text not in DRIVESPEC_TYPES:
        raise DrivespecError("type", type_text,
                             f"unknown type (expected {', '.join(DRIVESPEC_TYPES)})")
    etfs_type = EtfsType(type_text)
    symlinks = given.get("symlinks", "refuse")
    if symlinks not in SYMLINK_POLICIES:
        raise DrivespecError("symlinks", symlinks,
                             f"unknown policy (expected {', '.join(SYMLINK_POLICIES)})")

    _check_alone(given, "disklabel", ("size", "offset", "partition"))
    _check_alone(given, "partition", ("size", "offset"))
    if given.get("size") == "host" and "offset" in given:
        raise DrivespecError("size", "host", f"cannot be combined with offset={given['offset']}")
    if etfs_type.is_dir:
        for token in ("size", "offset", "disklabel", "partition"):
            if token in given:
                raise DrivespecError(token, given[token], f"type={type_text} takes no {token}")

    size = offset = None
    if "size" in given and given["size"] != "host":
        size = _size(given, "size")
        if size == 0:
            raise DrivespecError("size", given["size"], "size must be greater than zero")
    if "offset" in given:
        offset = _size(given, "offset")
    if size is not None and offset is not None and size + offset > MAX_SIZE:
        raise DrivespecError("offset", given["offset"],
                             f"window offset+size ends past {MAX_SIZE} bytes")
    disklabel = given.get("disklabel")
    if disklabel is not None and (len(disklabel) != 1 or disklabel not in LABEL_PARTITION_LETTERS):
        raise DrivespecError("disklabel", disklabel,
                             f"not a partition letter a…{LABEL_PARTITION_LETTERS[-1]}")
    partition = None
    if "partition" in given:
        text_n = given["partition"]
        digits = text_n.lstrip("0")
        if (not text_n.isascii() or not text_n.isdigit() or len(digits) > 6
                or not 1 <= int(digits or "0") <= MAX_PARTITION_NUMBER):
            raise DrivespecError("partition", text_n,
                                 f"not a partition number 1…{MAX_PARTITION_NUMBER}")
        partition = int(digits)
    has_extent = "size" in given or disklabel is not None or partition is not None
    if not has_extent and etfs_type in (EtfsType.BLK, EtfsType.CHR):
        raise DrivespecError("size", None,
                             f"missing: type={type_text} needs size=…, disklabel=… or partition=…")
    return Drivespec(key, given["hostpath"], etfs_type, size, given.get("size") == "host",
                     offset or 0, disklabel, partition, symlinks == "follow")


def _check_alone(given: dict[str, str], token: str, others: tuple[str, ...]) -> None:
    if token in given:
        for other in others:
            if other in given:
                raise DrivespecError(token, given[token],
                                     f"must be used alone, not with {other}={given[other]}")


def _size(given: dict[str, str], token: str) -> int:
    try:
        return parse_size(given[token])
    except SizeError as e:
        raise DrivespecError(token, given[token], str(e).split(": ", 1)[-1]) from None


@dataclass
class Applied:
    """What `apply` did, so that `undo` can take it back."""

    spec: Drivespec
    key: str
    created_file: bool = False
    grown_from: int | None = None  # the file's size before apply grew it
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file created or grown

    async def undo(self, namespace: Namespace) -> None:
        try:
            await namespace.remove(self.key, force=True)
        finally:
            if self.identity is not None:
                _restore_host_file(self.spec, self.identity, self.created_file,
                                   self.grown_from)


def _restore_host_file(spec: Drivespec, identity: tuple[int, int], created: bool,
                       grown_from: int | None, fd: int | None = None) -> None:
    """Remove the file apply created or cut back the file it grew, if its path still leads
    to that file (`fd`: apply's descriptor of it, when still open); else leave it alone."""
    if created:
        unlink_host_file(spec.hostpath, identity, spec.follow_symlinks)
    elif grown_from is not None:
        own = fd is None
        if own:
            try:
                fd, _ = open_host_file(spec.hostpath, _any_kind, spec.follow_symlinks)
            except HostPathError:
                return
        assert fd is not None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == identity:
                os.ftruncate(fd, grown_from)
        finally:
            if own:
                os.close(fd)


def _any_kind(st: os.stat_result) -> None:
    """open_host_file's type check where any type apply could have grown will do."""


def apply(spec: Drivespec, namespace: Namespace) -> Applied:
    """Create or grow the host file as needed and register the key (module docstring)."""
    # Absolute now, so that undo() after a chdir (daemonizing) touches the same file.
    spec = replace(spec, hostpath=os.path.abspath(spec.hostpath))
    try:
        namespace.check_free(spec.key, spec.type.is_dir)
    except OSError as e:
        raise DrivespecError("key", spec.key, e.strerror or "in use", e.errno) from None
    if spec.type.is_dir:
        _register(namespace, spec, 0, RUMP_ETFS_SIZE_ENDOFF, "hostpath", spec.hostpath)
        return Applied(spec, spec.key)

    fd, created = _open_host_file(spec)
    identity = (0, 0)
    grown_from = None
    try:
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        begin, size, token, value = _window(spec, fd)
        # Only an explicit size grows a file: a table that points past the end of its image
        # means a truncated image, which growing would hide.
        if spec.size is not None and stat.S_ISREG(st.st_mode):
            fsize = host_size(fd)
            if fsize < begin + size:
                try:
                    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                        # Opened read-only because read-write was refused: say why.
                        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
                    os.ftruncate(fd, begin + size)  # sparse: no blocks are allocated
                except OSError as e:
                    raise DrivespecError(token, value, f"cannot extend {spec.hostpath} to "
                                         f"{begin + size} bytes: {e.strerror}", e.errno) from None
                grown_from = fsize
        _register(namespace, spec, begin, size, token, value, fd)
    except BaseException:
        _restore_host_file(spec, identity, created, grown_from, fd)
        raise
    finally:
        os.close(fd)
    return Applied(spec, spec.key, created, grown_from, identity)


def _register(namespace: Namespace, spec: Drivespec, begin: int, size: int, token: str,
              value: str, fd: int | None = None) -> None:
    try:
        namespace.register(spec.key, spec.hostpath, spec.type, begin, size,
                           spec.follow_symlinks, fd)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENAMETOOLONG):
            token, value = "key", spec.key
        elif e.errno != errno.EINVAL:  # EINVAL is the window; everything else is the file
            token, value = "hostpath", spec.hostpath
        raise DrivespecError(token, value, e.strerror or str(e), e.errno) from None


def _open_host_file(spec: Drivespec) -> tuple[int, bool]:
    """An fd of the host file, created (0644 & ~umask) unless the spec needs it to exist."""
    must_exist = spec.size_from_host or spec.disklabel is not None or spec.partition is not None
    path = spec.hostpath

    def kind(st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, f"is a directory (type={spec.type.value})")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise OSError(errno.EINVAL, "neither a regular file nor a block device")

    try:
        return open_host_file(path, kind, spec.follow_symlinks,
                              None if must_exist else 0o644)
    except HostPathError as e:
        raise DrivespecError("hostpath", path, e.reason, e.errno) from None


def _window(spec: Drivespec, fd: int) -> tuple[int, int, str, str]:
    """(begin, size, token, value): the window, and the token an error about it should name."""
    if spec.size_from_host:
        fsize = host_size(fd)
        if fsize == 0:
            raise DrivespecError("size", "host", f"{spec.hostpath} is empty")
        return 0, fsize, "size", "host"
    if spec.disklabel is not None or spec.partition is not None:
        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        try:
            if spec.disklabel is not None:
                token, value = "disklabel", spec.disklabel
                found: Partition = disklabel_partition(read_at, spec.disklabel)
            else:
                token, value = "partition", str(spec.partition)
                found = numbered_partition(read_at, spec.partition or 0)
        except OSError as e:
            raise DrivespecError(token, value, e.strerror or str(e), e.errno) from None
        return found.offset, found.length, token, value
    size = RUMP_ETFS_SIZE_ENDOFF if spec.size is None else spec.size
    if spec.offset:
        return spec.offset, size, "offset", str(spec.offset)
    return spec.offset, size, "size", str(spec.size)


def parse_all(texts: Iterable[str]) -> list[Drivespec]:
    return [parse(text) for text in texts]


async def apply_all(texts: Iterable[str], namespace: Namespace) -> list[Applied]:
    """Parse every drivespec (so a typo creates nothing), then apply them in order.

    When one fails, the ones applied before it are undone, files they created included, and
    its DrivespecError is raised.
    """
    specs = parse_all(texts)
    done: list[Applied] = []
    try:
        for spec in specs:
            done.append(apply(spec, namespace))
    except BaseException:
        for applied in reversed(done):
            await applied.undo(namespace)
        raise
    return done
