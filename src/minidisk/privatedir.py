"""Directories root keeps state in and mounts below, which no other user can redirect.

Root writes state files there and later acts on what they say (umount, detach, signal a
pid), and mounts below them. If a user could change any directory on the way, it could swap
in a symlink or a directory of its own between our check and our use. So every directory on
the way up to / must belong to root (or to us) and be writable by nobody else; a sticky
directory such as /tmp will do above it (others may add names there, but not take ours).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path


def state_root() -> Path:
    """Where minidisk keeps its state (attachments, links): $MINIDISK_STATE_DIR; else
    /run/minidisk for root, and for another user $XDG_RUNTIME_DIR/minidisk (systemd's
    /run/user/UID) when that directory is the user's, else /tmp/minidisk-UID, which
    private_dir accepts only as that user's own 0700 directory."""
    if configured := os.environ.get("MINIDISK_STATE_DIR"):
        return Path(configured)
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/minidisk")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    try:  # only the user's own: one inherited from root (sudo, setpriv) is not writable
        if runtime and os.stat(runtime).st_uid == uid:
            return Path(runtime) / "minidisk"
    except OSError:
        pass
    return Path(f"/tmp/minidisk-{uid}")


class UntrustedDirectory(PermissionError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """`path`, made with `mode` (and missing parents 0755) unless it is there, once it and
    every directory above it are trusted (module docstring) and it grants others no more
    than `mode` does. UntrustedDirectory says what is wrong otherwise."""
    missing = []
    existing = path
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = existing.parent
    if not missing:
        _narrow(path, mode)
    _refuse_untrusted(Path(os.path.realpath(existing)), final=not missing, mode=mode)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=mode if directory == path else 0o755)
        _refuse_untrusted(Path(os.path.realpath(directory)), final=directory == path,
                          mode=mode)
    return path


def _narrow(path: Path, mode: int) -> None:
    """Take away what `path` grants others beyond `mode`, when it is a directory of ours that
    nobody else can write (one made by an older minidisk with 0755): its contents are ours
    alone, so only reading it was open. Anything else is left for the check to refuse."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o022 and st.st_mode & 0o077 & ~mode:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(0o077 & ~mode))
    finally:
        os.close(fd)


def _refuse_untrusted(real: Path, final: bool, mode: int) -> None:
    for directory in [real, *real.parents]:
        st = os.lstat(directory)
        writable = st.st_mode & 0o022
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or \
                (writable and ((final and directory == real) or not st.st_mode & stat.S_ISVTX)) or \
                (final and directory == real and st.st_mode & 0o077 & ~mode):
            raise UntrustedDirectory(
                f"{directory} can be changed or read by others (uid {st.st_uid}, mode "
                f"{st.st_mode & 0o7777:o})")
