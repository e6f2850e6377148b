"""`link` and `unlink` on the client machine: authorize and lock (through a keeper process),
attach, mount — and back again, in the opposite order.

State, so that `unlink` (another process, later) finds what `link` made, one JSON file per
link under $MINIDISK_STATE_DIR/link (default /run/minidisk/link): `owner.disk.json` for a
link made with the caller's own identity, `owner.disk.uidN.json` for one made for local user
N (the automounter's, the program map's). It is rewritten after every step in both
directions, so a link that failed halfway is undone by `unlink`, and an `unlink` that failed
halfway (a busy mount) can simply be run again: it goes on where it stopped, never out of
order — umount, detach, then stop the keeper (which unlocks).

Root acts on these files, so the directory must be ours alone and no directory above it
changeable by another user (privatedir.py: a planted symlink or a directory of the user's is
refused); every file in it is opened relative to a descriptor of it, with O_NOFOLLOW.

A link for another local user (`as_user`) is made by processes of that user's identity
(asuser.py): the resolve and the keeper's control connection, and the data connections
(attach with connect_as), so the server admits exactly what that user's grants admit.
Attach and mount still run here, as root, once the link was granted to that user.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minidisk import control_client
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.attach import attach as attach_export
from minidisk.kernel.attach import detach as detach_device
from minidisk.kernel.commands import Helper, run
from minidisk.kernel.errors import KernelError, NotAttachedError
from minidisk.link.asuser import LocalUser
from minidisk.link.names import DiskKey, parse_key
from minidisk.nbd.listen import parse_url
from minidisk.nbd.tls import client_context
from minidisk.nbd.transport import Transport
from minidisk.privatedir import UntrustedDirectory, private_dir, state_root

KEEPER_EXIT_GRACE = 10.0


class LinkError(OSError):
    """A step of link or unlink that failed, as OSError(errno, strerror) (so that a caller
    catching OSError catches it too), printed as its message alone: the CLI's one line."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.strerror or ""


@dataclass
class LinkState:
    disk: str  # owner.disk
    server: str
    export: str
    mode: str
    access: str = "read-only"  # what the server granted: read-only or read-write
    degraded: bool = False
    partition: int | None = None
    keeper: Helper | None = None
    device: str = ""
    mountpoint: str = ""
    fstype: str = ""
    on_behalf_of: str = ""  # "program map": made for the stock automount (see unlink_idle)
    linked_at: float = 0.0  # time.time() when the link was made
    uid: int | None = None  # the local user it was made for; None: whoever ran `link`
    entry: str = ""  # program map: the automount path whose symlink leads to mountpoint
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The name of its state: `owner.disk`, or `owner.disk.uidN` when made for user N."""
        return self.disk if self.uid is None else f"{self.disk}.uid{self.uid}"

    @property
    def read_only(self) -> bool:
        return self.access != "read-write"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LinkState:
        raw = json.loads(text)
        if raw.get("keeper"):
            raw["keeper"] = Helper(**raw["keeper"])
        return cls(**raw)

    def summary(self) -> str:
        access = "FORCED R/O" if self.degraded else self.access
        where = f" as {self.device}" if self.device else ""
        if self.mountpoint:
            where += f", mounted at {self.mountpoint} ({self.fstype or 'unknown'}"
            where += ", ro)" if self.read_only else ")"
        return f"{self.disk} linked {self.mode} ({access}){where}"


def state_dir() -> Path:
    return state_root() / "link"


_ID = re.compile(r"([a-z0-9][a-z0-9_-]{0,31}\.[0-9a-f]{4})(?:\.uid([0-9]{1,10}))?")


@contextlib.contextmanager
def _private_dir(create: bool = True) -> Iterator[int]:
    """A descriptor of the state directory, checked to be ours alone (module docstring)."""
    directory = state_dir()
    if not create and not os.path.lexists(directory):
        raise FileNotFoundError(errno.ENOENT, "no link state", str(directory))
    try:
        private_dir(directory)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except UntrustedDirectory as e:
        raise LinkError(errno.EPERM, f"{e}: refusing to keep link state there") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _open_in(directory: int, name: str, flags: int) -> int:
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=directory)


def _save(state: LinkState) -> None:
    with _private_dir() as directory:
        tmp = f"{state.id}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=directory)
        fd = _open_in(directory, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
        os.replace(tmp, f"{state.id}.json", src_dir_fd=directory, dst_dir_fd=directory)


def _read(directory: int, name: str) -> LinkState:
    with os.fdopen(_open_in(directory, name, os.O_RDONLY)) as f:
        return LinkState.from_json(f.read())


def links() -> list[LinkState]:
    found = []
    try:
        with _private_dir(create=False) as directory:
            for name in sorted(os.listdir(directory)):
                if name.endswith(".json") and _ID.fullmatch(name.removesuffix(".json")):
                    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                        found.append(_read(directory, name))
    except FileNotFoundError:
        pass
    return found


def nbd_uri(server: str, export: str, tls_certificates: str | None) -> str:
    """The NBD URI of `export` on the server whose control URL is `server`."""
    address = parse_url(server)
    if address.kind is Transport.UNIX:
        scheme = "nbds+unix" if tls_certificates else "nbd+unix"
        uri = f"{scheme}:///{export}?socket={address.path}"
        return uri + (f"&tls-certificates={tls_certificates}" if tls_certificates else "")
    if address.kind is Transport.TCP:
        host = "127.0.0.1" if address.host in ("", "0.0.0.0") else address.host
        if tls_certificates:
            return f"nbds://{host}:{address.port}/{export}?tls-certificates={tls_certificates}"
        return f"nbd://{host}:{address.port}/{export}"
    raise LinkError(errno.EINVAL, f"cannot reach disks at {server} (want unix:// or tcp://)")


def resolve(key: str, server: str, tls_certificates: str | None = None,
            as_user: LocalUser | None = None) -> dict[str, Any]:
    """Where the disk `key` names lives, and the grant on it of the caller (or `as_user`)."""
    if as_user is not None:
        return _resolve_as(as_user, key, server, tls_certificates)
    tls = client_context(tls_certificates) if tls_certificates else None
    try:
        return control_client.call(server, "resolve", {"key": key}, tls=tls, timeout=60.0)
    except control_client.ControlError as e:
        raise LinkError(e.errno or errno.EIO, str(e)) from None


def _resolve_as(user: LocalUser, key: str, server: str,
                tls_certificates: str | None) -> dict[str, Any]:
    done = subprocess.run([*user.argv(), "resolve", server, key,
                           *([tls_certificates] if tls_certificates else [])],
                          capture_output=True, text=True, timeout=90, cwd="/",
                          stdin=subprocess.DEVNULL)
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        raise LinkError(errno.EIO, f"resolving {key} as {user} failed "
                        f"(exit {done.returncode}): "
                        f"{done.stderr.strip()[-300:]}") from None
    if not answer.get("ok"):
        raise _refused(answer)
    result = answer["result"]
    assert isinstance(result, dict)
    return result


def _refused(answer: dict[str, Any]) -> LinkError:
    """The error a helper (the keeper, a resolve as another user) answered in JSON."""
    err = answer.get("errno")
    return LinkError(err if type(err) is int and err > 0 else errno.EIO,
                     str(answer.get("error")))


def link(key_text: str, server: str, *, mountpoint: str | None = None,
         mode: str | None = None, password: str | None = None,
         tls_certificates: str | None = None, attach: bool = True,
         on_behalf_of: str | None = None, as_user: LocalUser | None = None,
         resolved: dict[str, Any] | None = None, entry: str = "") -> LinkState:
    """Link the disk `key_text` names in `mode`, attach it and (with a mountpoint) mount it;
    with `as_user`, as that local user (module docstring); `resolved`: what resolve() said
    for the key, if the caller asked already; `entry`: see LinkState. On any failure
    everything done so far is undone and LinkError says why."""
    try:
        key = parse_key(key_text)
    except ValueError as e:
        raise LinkError(errno.EINVAL, str(e)) from None
    if key.partition is not None and mountpoint is None:
        raise LinkError(errno.EINVAL, f"{key}: a partition can only be named with a mount "
                        "point")
    found = resolved or resolve(key_text, server, tls_certificates, as_user)
    state = LinkState(disk=found["disk"], server=found["server"], export=found["export"],
                      mode=(mode or "R").upper(), partition=key.partition,
                      on_behalf_of=on_behalf_of or "", linked_at=time.time(),
                      uid=as_user.uid if as_user is not None else None, entry=entry)
    existing = load(state.id)
    if existing is not None:
        alive = existing.keeper is not None and existing.keeper.alive()
        raise LinkError(errno.EEXIST, f"{key.name} is already linked here"
                        f"{f' for {as_user}' if as_user else ''}"
                        f"{'' if alive else ' (its link was lost)'}: "
                        f"minidisk unlink {state.id} first")
    _start_keeper(state, password, tls_certificates, on_behalf_of, as_user)
    try:
        if attach:
            _attach_and_mount(state, key, mountpoint, tls_certificates, as_user)
    except BaseException:
        with contextlib.suppress(LinkError):
            unlink(state.id)
        raise
    return state


def _start_keeper(state: LinkState, password: str | None, tls_certificates: str | None,
                  on_behalf_of: str | None, as_user: LocalUser | None) -> None:
    runner = ([sys.executable, "-m", "minidisk.link.keeper"] if as_user is None
              else [*as_user.argv(), "keeper"])
    argv = [*runner, "--server", state.server, "--disk", state.disk, "--mode", state.mode]
    if password is not None:
        argv.append("--password-on-stdin")
    if tls_certificates:
        argv += ["--tls-certificates", tls_certificates]
    if on_behalf_of:
        argv += ["--on-behalf-of", on_behalf_of]
    with _private_dir() as directory:
        log_fd = _open_in(directory, f"{state.id}.keeper.log",
                          os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(log_fd, "ab") as log_out:
        keeper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=log_out, cwd="/", start_new_session=True)
    assert keeper.stdin is not None and keeper.stdout is not None
    try:
        with keeper.stdin:
            if password is not None:
                keeper.stdin.write(password.encode() + b"\n")
        line = keeper.stdout.readline()
    finally:
        keeper.stdout.close()
    try:
        answer = json.loads(line)
    except ValueError:
        keeper.wait()
        raise LinkError(errno.EIO, f"the link keeper failed (exit {keeper.returncode}); see "
                        f"{state_dir() / (state.id + '.keeper.log')}") from None
    if not answer.get("ok"):
        keeper.wait()
        raise _refused(answer)
    state.keeper = Helper.of("link keeper", keeper.pid)
    keeper.returncode = 0  # it outlives us; init reaps it (as attach does with nbdfuse)
    state.access = str(answer["access"])
    state.degraded = bool(answer["degraded"])
    _save(state)


def _attach_and_mount(state: LinkState, key: DiskKey, mountpoint: str | None,
                      tls_certificates: str | None, as_user: LocalUser | None) -> None:
    connect_as = (as_user.uid, as_user.gid) if as_user is not None else None
    try:
        attachment = attach_export(nbd_uri(state.server, state.export, tls_certificates),
                                   read_only=state.read_only, connect_as=connect_as)
    except (KernelError, UntrustedDirectory) as e:
        raise LinkError(errno.EIO, f"attach: {e}") from None
    state.device = attachment.device
    _save(state)
    if mountpoint is None:
        return
    options: list[str] = []
    try:
        device = state.device
        if key.partition is not None:
            start, size = _partition_window(device, key.partition)
            options += [f"offset={start}", f"sizelimit={size}"]
            fstype = _detect_in_window(device, start, size)
        else:
            fstype = kernel_mount.detect_filesystem(device)
        Path(mountpoint).mkdir(parents=True, exist_ok=True)
        kernel_mount.mount(device, mountpoint, fstype=fstype, options=options,
                           read_only=state.read_only)
    except KernelError as e:
        raise LinkError(errno.EIO, f"mount: {e}") from None
    state.mountpoint = os.path.realpath(mountpoint)
    state.fstype = fstype or ""
    _save(state)


def _partition_window(device: str, number: int) -> tuple[int, int]:
    """(offset, size) in bytes of partition `number` of `device`, from its partition table."""
    table = json.loads(run(["sfdisk", "--json", device]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    for part in table.get("partitions", []):
        suffix = re.search(r"(\d+)$", part["node"])
        if suffix is not None and int(suffix.group(1)) == number:
            return int(part["start"]) * sector, int(part["size"]) * sector
    raise LinkError(errno.ENOENT, f"{device} has no partition {number}")


def _detect_in_window(device: str, start: int, size: int) -> str | None:
    """The file-system type blkid finds in bytes [start, start+size) of `device`, or None."""
    done = run(["blkid", "-p", "-o", "value", "-s", "TYPE", "-O", str(start), "-S", str(size),
                device], ok_codes=(0, 2))
    return done.stdout.strip() or None


def load(link_id: str) -> LinkState | None:
    try:
        with _private_dir(create=False) as directory:
            return _read(directory, f"{link_id}.json")
    except FileNotFoundError:
        return None


def find(target: str) -> LinkState:
    """The link `target` names: its id (`owner.disk`, `owner.disk.uidN`: the only link of
    that disk here will do for `owner.disk`) or the mount point it is mounted on."""
    with contextlib.suppress(ValueError):
        target = parse_key(target, partition=False).name  # ALICE.191 → alice.0191
    if _ID.fullmatch(target):
        state = load(target)
        if state is not None:
            return state
        others = [s.id for s in links() if s.disk == target]
        if len(others) == 1:
            return load(others[0]) or find(others[0])
        if others:
            raise LinkError(errno.EEXIST, f"{target} is linked here for several users: name "
                            f"one of {', '.join(others)}")
    real = os.path.realpath(target)
    for state in links():
        if state.mountpoint and state.mountpoint == real:
            return state
    raise LinkError(errno.ENOENT, f"{target}: not linked here (no state in {state_dir()})")


@contextlib.contextmanager
def _locked(link_id: str) -> Iterator[LinkState]:
    """The state of link `link_id` under an exclusive lock, so two unlinks never race."""
    with _private_dir() as directory:
        try:
            fd = _open_in(directory, f"{link_id}.json", os.O_RDWR)
        except FileNotFoundError:
            raise LinkError(errno.ENOENT, f"{link_id}: not linked here") from None
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_nlink == 0:
            raise LinkError(errno.ENOENT, f"{link_id} was unlinked meanwhile")
        yield LinkState.from_json(f.read())


def unlink(target: str) -> LinkState:
    """Umount, detach, unlock — in that order, each only if still needed, stopping at the
    first step that fails (state kept, so running unlink again finishes the job)."""
    link_id = find(target).id
    with _locked(link_id) as state:
        if state.mountpoint:
            if kernel_mount.mounted_at(state.mountpoint):
                try:
                    kernel_mount.umount(state.mountpoint)
                except KernelError as e:
                    raise LinkError(errno.EIO, f"umount {state.mountpoint}: {e}") from None
            state.mountpoint = ""
            _save(state)
        if state.device:
            try:
                detach_device(state.device)
            except NotAttachedError:
                pass
            except KernelError as e:
                raise LinkError(errno.EIO, f"detach {state.device}: {e}") from None
            state.device = ""
            _save(state)
        if state.keeper is not None:
            _stop_keeper(state.keeper)
            state.keeper = None
            _save(state)
        with _private_dir() as directory, contextlib.suppress(FileNotFoundError):
            os.unlink(f"{link_id}.json", dir_fd=directory)
        return state


PROGRAM_MAP = "program map"


def unlink_idle(min_age: float = 60.0) -> tuple[list[LinkState], list[str]]:
    """Unlink every link made for the stock automount's program map (`on_behalf_of`) whose
    device is mounted nowhere and held by nobody, once it is `min_age` seconds old (the
    automounter mounts the device only after the map program returns). The stock daemon has
    no unmount hook: this, run from a timer, is what ends such links after expiry. Returns
    the links ended and one line for each that could not be."""
    ended, problems = [], []
    now = time.time()
    for state in links():
        if state.on_behalf_of != PROGRAM_MAP or now - state.linked_at < min_age:
            continue
        if state.entry and _leads_to(state.entry, state.mountpoint):
            continue  # the automount's name for it is still there
        mountpoint = state.mountpoint
        try:
            ended.append(unlink(state.id))
        except LinkError as e:
            if not (mountpoint and kernel_mount.mounted_at(mountpoint)):
                problems.append(f"{state.id}: {e}")
            continue  # (still mounted: a file under it is open, so it is still in use)
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)
    return ended, problems


def _leads_to(entry: str, mountpoint: str) -> bool:
    """Whether the automount's symlink `entry` is there and leads to `mountpoint`. Its
    directory is listed first: looking up a name that is not there would make the automount
    run the program map again."""
    directory, name = os.path.split(entry)
    try:
        return name in os.listdir(directory) and os.readlink(entry) == mountpoint
    except OSError:
        return False


# A POSIX ACL (the system.posix_acl_access xattr, acl_ea.h): version, then (tag, perm, id).
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF


def _search_only_for(uid: int) -> bytes:
    """Owner (root) rwx, `uid` search only (--x), group and others nothing."""
    entries = [(_ACL_USER_OBJ, 7, _ACL_NO_ID), (_ACL_USER, 1, uid), (_ACL_GROUP_OBJ, 0, _ACL_NO_ID),
               (_ACL_MASK, 1, _ACL_NO_ID), (_ACL_OTHER, 0, _ACL_NO_ID)]
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def user_mount_point(user: LocalUser, name: str) -> str:
    """$MINIDISK_STATE_DIR/vmlink/UID/NAME, a directory for mounting a link of `user`'s: every
    directory on the way is ours and closed to writing by others (so no user can redirect the
    path root mounts on), and UID's is 0700 with an ACL that lets `user` alone search it (so
    only that user reaches what is mounted there)."""
    top = state_dir().parent / "vmlink"
    try:
        private_dir(top, mode=0o711)
    except UntrustedDirectory as e:
        raise LinkError(errno.EPERM, f"{e}: refusing to mount below it") from None
    directory = top / str(user.uid)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o067:  # (the ACL mask shows as g+x)
            raise LinkError(errno.EPERM, f"{directory}: owned by uid {st.st_uid} with mode "
                            f"{st.st_mode & 0o777:o}, not ours alone")
        try:
            os.setxattr(fd, "system.posix_acl_access", _search_only_for(user.uid))
        except OSError as e:
            raise LinkError(e.errno or errno.EIO, f"{directory}: cannot let only {user} in "
                            f"(POSIX ACL: {e.strerror}); use a MINIDISK_STATE_DIR that has "
                            "ACLs") from None
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=fd)
        os.close(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd))
    finally:
        os.close(fd)
    return str(directory / name)


def _stop_keeper(keeper: Helper) -> None:
    """SIGTERM makes the keeper unlink and exit; it ends the link even if it cannot."""
    if keeper.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(keeper.pid, signal.SIGTERM)
    try:
        keeper.stop(KEEPER_EXIT_GRACE)
    except (TimeoutError, PermissionError) as e:
        raise LinkError(e.errno or errno.EIO, f"the link keeper: {e}") from None
