"""The kernel's autofs v5 protocol, from userspace, with the standard library only.

(Documentation/filesystems/autofs.rst; research/vmlink-etfs-buse.md §3.3.) An indirect
autofs mount at a directory traps every lookup of a name under it that is not yet a mount
point. The kernel writes a *missing* packet into our pipe and puts the looking-up process to
sleep until we answer the packet's token with READY (the name is there now: mounted, or a
symlink) or FAIL (ENOENT). Processes in the daemon's process group are never trapped, so we
can mkdir and mount under the root ourselves. For expiry we call EXPIRE_MULTI (from a thread
other than the one reading packets: it blocks until the *expire* packet it causes has been
answered); the kernel picks a name unused for the timeout and sends it to us to unmount.

CATATONIC detaches the daemon: every pending and future lookup then fails at once with
ENOENT instead of sleeping, which is what must happen before a daemon exits.

One daemon may serve several mounts, nested ones too (an autofs mount on a directory of
another), through one pipe: each packet names the device of the mount it comes from. A mount
made for one user (`owner`) has that uid and gid (the `uid=`/`gid=` options) and mode 0700 on
its root before any lookup under it is answered, so the kernel keeps every other uid out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

NO_AUTOFS = ("this kernel ({release}) has no autofs: it is not in /proc/filesystems and "
             "`modprobe autofs4` cannot load it, so /vmlink cannot work here")


def kernel_has_autofs() -> bool:
    """Whether this kernel mounts autofs: built in, or its module loads (modprobe, quietly)."""
    def listed() -> bool:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["autofs"] for line in f)

    if listed():
        return True
    subprocess.run(["modprobe", "-q", "autofs4"], capture_output=True, check=False)
    return listed()


PROTO_VERSION = 5
# struct autofs_v5_packet: hdr{proto_version, type}, token, dev, ino, uid, gid, pid, tgid,
# len, name[NAME_MAX + 1]; 304 bytes with its tail padding on 64-bit.
_V5_PACKET = struct.Struct("=iiIIQIIIII256s")
PACKET_SIZE = 304
MISSING_INDIRECT = 3
EXPIRE_INDIRECT = 4

_AUTOFS = 0x93
AUTOFS_IOC_READY = (_AUTOFS << 8) | 0x60  # _IO(0x93, 0x60)
AUTOFS_IOC_FAIL = (_AUTOFS << 8) | 0x61
AUTOFS_IOC_CATATONIC = (_AUTOFS << 8) | 0x62
AUTOFS_IOC_SETTIMEOUT = (3 << 30) | (8 << 16) | (_AUTOFS << 8) | 0x64  # _IOWR(…, ulong)
AUTOFS_IOC_EXPIRE_MULTI = (1 << 30) | (4 << 16) | (_AUTOFS << 8) | 0x66  # _IOW(…, int)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class Packet:
    type: int
    token: int
    dev: int  # st_dev of the mount the packet comes from
    uid: int  # who looked the name up
    gid: int
    pid: int
    name: str

    @classmethod
    def parse(cls, raw: bytes) -> Packet:
        version, kind, token, dev, _ino, uid, gid, pid, _tgid, length, name = \
            _V5_PACKET.unpack_from(raw)
        if version != PROTO_VERSION:
            raise ValueError(f"autofs protocol {version}, not {PROTO_VERSION}")
        return cls(kind, token, dev, uid, gid, pid,
                   name[:length].decode("utf-8", "surrogateescape"))


class PacketPipe:
    """The pipe our mounts write packets into (packet mode: one read returns one packet).
    Reading ends (None) once our write end is closed and every mount is catatonic."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_DIRECT | os.O_CLOEXEC)

    def read_packet(self) -> Packet | None:
        raw = os.read(self.read_end, PACKET_SIZE)
        return Packet.parse(raw) if raw else None

    def close_write_end(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    def close(self) -> None:
        self.close_write_end()
        os.close(self.read_end)


class AutofsMount:
    """One indirect autofs mount that this process serves; `owner` (uid, gid): for that
    user alone (module docstring)."""

    def __init__(self, root: str | Path, timeout: int, pipe: PacketPipe,
                 owner: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        if os.getpgrp() != os.getpid():
            # Our process group is never trapped: sharing a script's would make every
            # process of the script see an empty directory instead of asking us.
            os.setpgid(0, 0)
        self.root.mkdir(parents=True, exist_ok=True)
        options = (f"fd={pipe.write_end},pgrp={os.getpgrp()},minproto={PROTO_VERSION},"
                   f"maxproto={PROTO_VERSION},indirect")
        if owner is not None:
            options += f",uid={owner[0]},gid={owner[1]}"
        if _libc.mount(b"minidisk-automount", str(self.root).encode(), b"autofs", 0,
                       options.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount autofs on {self.root}: {os.strerror(err)}")
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.catatonic = False
        try:
            if owner is not None:
                os.fchmod(self.fd, 0o700)
            fcntl.ioctl(self.fd, AUTOFS_IOC_SETTIMEOUT, struct.pack("=Q", timeout))
            self.dev = os.fstat(self.fd).st_dev
        except BaseException:
            self.close()
            raise

    def ready(self, token: int) -> None:
        self._answer(AUTOFS_IOC_READY, token)

    def fail(self, token: int) -> None:
        self._answer(AUTOFS_IOC_FAIL, token)

    def _answer(self, request: int, token: int) -> None:
        try:
            fcntl.ioctl(self.fd, request, token)
        except OSError as e:
            # Catatonic (or the waiter gave up): nobody waits for this token any more.
            if e.errno not in (errno.ENXIO, errno.EINVAL):
                raise

    def expire_one(self) -> bool:
        """Ask the kernel to expire one idle name; True when it did (and we answered)."""
        try:
            fcntl.ioctl(self.fd, AUTOFS_IOC_EXPIRE_MULTI, struct.pack("=i", 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ENXIO, errno.EBADF):
                return False
            raise
        return True

    def go_catatonic(self) -> None:
        """Every pending and later lookup fails with ENOENT at once; no caller can hang."""
        if not self.catatonic:
            fcntl.ioctl(self.fd, AUTOFS_IOC_CATATONIC, 0)
            self.catatonic = True

    def close(self) -> None:
        """Catatonic, then unmount the autofs file system itself (lazily if busy)."""
        self.go_catatonic()
        os.close(self.fd)
        for flags in (0, 2):  # MNT_DETACH when someone still has it open
            if _libc.umount2(str(self.root).encode(), flags) == 0:
                return
        err = ctypes.get_errno()
        raise OSError(err, f"umount {self.root}: {os.strerror(err)}")
