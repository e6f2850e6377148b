"""Opening host paths by descriptor, so that what was checked is what gets opened.

A name checked with lstat and then opened by path can be swapped for a symbolic link in
between by anyone who can write in one of its directories, and root then opens (and
drivespec.apply creates, grows or truncates) a file elsewhere. So no host path is opened by
name after a check: it is resolved from a directory descriptor with symbolic links refused,
and every check is made on the opened descriptor (fstat).

* With openat2(2) (Linux 5.6+, called through syscall(2): Python 3.11 has no os.openat2) the
  kernel resolves the path with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS.
* Elsewhere the path is walked one component at a time: openat(dir, part, O_PATH |
  O_DIRECTORY | O_NOFOLLOW) for each directory (a symbolic link there is ENOTDIR), then
  openat(dir, last, … | O_NOFOLLOW) for the file (a symbolic link there is ELOOP).
* The file is opened with O_NONBLOCK, so a FIFO cannot block the open, and O_NOCTTY; its type
  is checked with fstat and O_NONBLOCK is cleared only then.

Directory keys resolve below their own O_PATH descriptor, taken at registration, so moving the
directory or one of its ancestors later does not redirect them. Operator-given host paths
(drivespecs, `etfs register`) resolve from `/` with the same rules: a symbolic link anywhere in
them is refused unless the operator asked for `symlinks=follow`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import stat
from collections.abc import Callable

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
# openat2 is 437 in the unified syscall table; other architectures number it differently.
_SYS_OPENAT2 = 437 if platform.machine() in ("x86_64", "aarch64", "riscv64", "ppc64le",
                                             "s390x", "armv7l", "i686") else None

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
_READ_ONLY_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY)

FileKind = Callable[[os.stat_result], None]  # raises OSError(errno, reason) for a wrong type


class HostPathError(OSError):
    """An operator's host path that cannot be opened: `path: reason`, on one line."""

    def __init__(self, code: int, path: str, reason: str) -> None:
        super().__init__(code, f"{path}: {reason}".replace("\n", " "))
        self.path = path
        self.reason = reason


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_works: bool | None = None  # None until probed; tests set False to force the walk


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    assert _SYS_OPENAT2 is not None
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter in front of it) lets us call openat2."""
    global _openat2_works
    if _openat2_works is None:
        _openat2_works = False
        if _SYS_OPENAT2 is not None:
            root = os.open("/", DIR_FLAGS)
            try:
                os.close(_openat2(root, ".", DIR_FLAGS))
                _openat2_works = True
            except OSError:
                pass  # ENOSYS (before Linux 5.6), or EPERM from a seccomp filter
            finally:
                os.close(root)
    return _openat2_works


def _open_beneath(dirfd: int, parts: list[str], flags: int, mode: int = 0) -> int:
    """openat of `parts` below `dirfd` with no symbolic link anywhere (module docstring)."""
    if not parts:  # the directory itself: only open_directory("/") asks for it
        return os.dup(dirfd)
    if openat2_available():
        return _openat2(dirfd, "/".join(parts), flags | os.O_NOFOLLOW, mode)
    fd = dirfd
    try:
        for part in parts[:-1]:
            parent, fd = fd, os.open(part, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            if parent != dirfd:
                os.close(parent)
        return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=fd)
    finally:
        if fd != dirfd:
            os.close(fd)


def _open_data(opener: Callable[[int], int], kind: FileKind, create: bool) -> tuple[int, bool]:
    """Open read-write (falling back to read-only, as rumpblk does) and non-blocking, check
    the type with fstat, then clear O_NONBLOCK. Returns (fd, whether it was created)."""
    created = False
    fd = -1
    if create:
        try:
            fd, created = opener(os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            pass  # there already (or someone made it since): opened as it is below
    if fd < 0:
        try:
            fd = opener(os.O_RDWR)
        except OSError as e:
            if e.errno not in _READ_ONLY_ERRORS:
                raise
            fd = opener(os.O_RDONLY)
    try:
        kind(os.fstat(fd))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _regular_only(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.ENOENT, "not a regular file")


def open_regular_below(dirfd: int, parts: list[str]) -> int:
    """The regular file `parts` below the directory `dirfd`, read-write if allowed.
    ELOOP or ENOTDIR for a symbolic link, ENOENT for anything but a regular file."""
    fd, _ = _open_data(lambda access: _open_beneath(dirfd, parts, access | _FILE_FLAGS),
                       _regular_only, False)
    return fd


def _components(path: str) -> list[str]:
    return [part for part in os.path.abspath(path).split("/") if part]


def _refusal(path: str, error: OSError, follow_symlinks: bool) -> HostPathError:
    """`error` of opening the operator's `path`; for a symbolic link, which component it is
    and how to allow it."""
    if not follow_symlinks and error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
        prefix = ""
        for part in _components(path):
            prefix += "/" + part
            try:
                is_link = stat.S_ISLNK(os.lstat(prefix).st_mode)  # for the message only
            except OSError:
                break
            if is_link:
                where = "" if prefix == os.path.abspath(path) else f" ({prefix})"
                return HostPathError(errno.ELOOP, path, f"a symbolic link{where} is not "
                                     "followed; give the real path, or the drivespec token "
                                     "symlinks=follow")
    return HostPathError(error.errno or errno.EIO, path, error.strerror or str(error))


def _open_parent(parts: list[str]) -> int:
    """The directory holding the absolute path `parts`, resolved from `/` with no links."""
    root = os.open("/", DIR_FLAGS)
    try:
        return _open_beneath(root, parts[:-1], DIR_FLAGS)
    finally:
        os.close(root)


def open_directory(path: str, follow_symlinks: bool = False) -> int:
    """An O_PATH descriptor of the operator's directory `path` (ENOTDIR if it is not one)."""
    try:
        if follow_symlinks:
            return os.open(path, DIR_FLAGS)
        return _open_parent([*_components(path), "."])
    except HostPathError:
        raise
    except OSError as e:
        raise _refusal(path, e, follow_symlinks) from None


def open_host_file(path: str, kind: FileKind, follow_symlinks: bool = False,
                   create_mode: int | None = None) -> tuple[int, bool]:
    """(fd, created) of the operator's host file `path`, read-write if allowed, its type
    checked by `kind` on the descriptor. With `create_mode` a missing file is created
    (O_EXCL, never through a symbolic link). Every error is a HostPathError."""
    parts = _components(path)
    if not parts:
        raise HostPathError(errno.EISDIR, path, "is a directory")
    try:
        if follow_symlinks:
            return _open_data(lambda access: os.open(path, access | _FILE_FLAGS,
                                                     create_mode or 0),
                              kind, create_mode is not None)
        parent = _open_parent(parts)
        try:
            return _open_data(lambda access: _open_beneath(parent, parts[-1:], access
                                                           | _FILE_FLAGS, create_mode or 0),
                              kind, create_mode is not None)
        finally:
            os.close(parent)
    except HostPathError:
        raise
    except OSError as e:
        raise _refusal(path, e, follow_symlinks) from None


def unlink_host_file(path: str, identity: tuple[int, int], follow_symlinks: bool) -> None:
    """Remove the operator's file `path` if it still is the file (st_dev, st_ino) `identity`
    (drivespec undo), resolved as open_host_file resolves it; a path that now leads elsewhere,
    or nowhere, is left alone."""
    parts = _components(path)
    try:
        parent = (os.open(os.path.dirname(os.path.abspath(path)), DIR_FLAGS)
                  if follow_symlinks else _open_parent(parts))
    except OSError:
        return
    try:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(parts[-1], dir_fd=parent)
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)
