"""File-system helpers for attached devices: detect, mkfs, mount, umount, fsck.

Thin wrappers over the util-linux/e2fsprogs tools so that callers (link, automount, the
quickstart, tests) get one spelling and errors that name the tool and quote its message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from minidisk.kernel.commands import run
from minidisk.kernel.errors import CommandError, DetachError

# fsck(8) exit status bits
FSCK_CORRECTED = 1
FSCK_REBOOT = 2
FSCK_UNCORRECTED = 4
FSCK_OPERATIONAL = 8
FSCK_USAGE = 16
FSCK_CANCELLED = 32
FSCK_LIBRARY = 128


def detect_filesystem(device: str) -> str | None:
    """The file-system type blkid finds on `device` by probing it (not its cache), or None."""
    # -p probes the device itself; exit 2 means "nothing recognised".
    done = run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], ok_codes=(0, 2))
    fstype = done.stdout.strip()
    return fstype or None


def mkfs(device: str, fstype: str = "ext4", *, label: str | None = None,
         options: Sequence[str] = ()) -> None:
    argv = [f"mkfs.{fstype}"]
    if fstype.startswith("ext"):
        argv += ["-F", "-q"]  # -F: a whole device, not a partition, is expected here
    if label is not None:
        argv += ["-L", label]
    run([*argv, *options, device], timeout=600)


def mount(device: str, mountpoint: str | Path, *, fstype: str | None = None,
          options: Sequence[str] = (), read_only: bool = False) -> None:
    opts = list(options)
    if read_only:
        opts.append("ro")
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    run([*argv, device, str(mountpoint)])


def umount(mountpoint: str | Path, *, lazy: bool = False) -> None:
    run(["umount", *(["-l"] if lazy else []), str(mountpoint)])


@dataclass(frozen=True)
class FsckResult:
    returncode: int
    output: str

    @property
    def clean(self) -> bool:
        return self.returncode == 0


def fsck(device: str, *, fstype: str | None = None, force: bool = True,
         repair: bool = False) -> FsckResult:
    """Check `device`; without `repair` nothing is changed (-n). Exit codes 0–7 are results,
    not failures, and come back in FsckResult; 8 and above (the checker itself failed) raise."""
    argv = ["fsck"]
    if fstype:
        argv += ["-t", fstype]
    # -f/-n/-p are not fsck's own and pass through to fsck.TYPE. Never put "--" before them:
    # fsck then takes the device for a checker option too, checks nothing and exits 0.
    if force:
        argv.append("-f")
    argv += ["-p" if repair else "-n", device]
    done = run(argv, timeout=600, ok_codes=range(8))
    return FsckResult(done.returncode, done.stdout + done.stderr)


def mounted_at(path: str | Path) -> bool:
    """Whether something is mounted exactly at `path` (in our mount namespace)."""
    target = os.path.realpath(path)
    for mountpoint in _mountpoints():
        if mountpoint == target:
            return True
    return False


def mounts_of(device: str) -> list[str]:
    """Mount points where block device `device` is mounted (by major:minor, so aliases match)."""
    try:
        rdev = os.stat(device).st_rdev
    except FileNotFoundError:
        return []
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == wanted:
                found.append(_unescape(fields[4]))
    return found


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def refuse_if_in_use(device: str) -> None:
    """DetachError unless nobody has `device` mounted or open exclusively.

    Tearing down a device in use would only defer the detach (losetup -d) or pull the disk
    from under a file system, so both backends check this first.
    """
    holders = mounts_of(device)
    if holders:
        raise DetachError(f"{device} is mounted on {', '.join(holders)}; unmount it first")
    try:
        # O_EXCL on a block device fails with EBUSY while anyone holds it exclusively
        # (a mount in another namespace, dm, md).
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
    except OSError as e:
        raise DetachError(f"{device} is in use ({e.strerror}); not detaching") from None


__all__ = ["CommandError", "FsckResult", "detect_filesystem", "fsck", "mkfs", "mount",
           "mounted_at", "mounts_of", "refuse_if_in_use", "umount"]
