"""`link` and `unlink` on the client machine: authorize and lock (through a keeper process),
attach, mount — and back again, in the opposite order.

State, so that `unlink` (another process, later) finds what `link` made, one JSON file per
linked disk under $MINIDISK_STATE_DIR/link (default /run/minidisk/link). It is rewritten
after every step in both directions, so a link that failed halfway is undone by `unlink`,
and an `unlink` that failed halfway (a busy mount) can simply be run again: it goes on where
it stopped, never out of order — umount, detach, then stop the keeper (which unlocks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minidisk.daemon import control
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.attach import attach as attach_export
from minidisk.kernel.attach import detach as detach_device
from minidisk.kernel.commands import Helper, run
from minidisk.kernel.errors import KernelError, NotAttachedError
from minidisk.link.names import DiskKey, parse_key
from minidisk.nbd.listen import parse_url
from minidisk.nbd.tls import client_context

KEEPER_EXIT_GRACE = 10.0


class LinkError(Exception):
    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


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
    extra: dict[str, Any] = field(default_factory=dict)

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
    return Path(os.environ.get("MINIDISK_STATE_DIR", "/run/minidisk")) / "link"


def _state_path(disk: str) -> Path:
    return state_dir() / f"{disk}.json"


def _save(state: LinkState) -> None:
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = _state_path(state.disk).with_suffix(".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, _state_path(state.disk))


def links() -> list[LinkState]:
    found = []
    for path in sorted(state_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            found.append(LinkState.from_json(path.read_text()))
    return found


def nbd_uri(server: str, export: str, tls_certificates: str | None) -> str:
    """The NBD URI of `export` on the server whose control URL is `server`."""
    address = parse_url(server)
    if address.kind == "unix":
        scheme = "nbds+unix" if tls_certificates else "nbd+unix"
        uri = f"{scheme}:///{export}?socket={address.path}"
        return uri + (f"&tls-certificates={tls_certificates}" if tls_certificates else "")
    if address.kind == "tcp":
        host = "127.0.0.1" if address.host in ("", "0.0.0.0") else address.host
        if tls_certificates:
            return f"nbds://{host}:{address.port}/{export}?tls-certificates={tls_certificates}"
        return f"nbd://{host}:{address.port}/{export}"
    raise LinkError(f"cannot reach disks at {server} (want unix:// or tcp://)")


def resolve(key: str, server: str, tls_certificates: str | None = None) -> dict[str, Any]:
    tls = client_context(tls_certificates) if tls_certificates else None
    try:
        return control.call(server, "resolve", {"key": key}, tls=tls, timeout=60.0)
    except control.ControlError as e:
        raise LinkError(str(e), e.errno) from None


def link(key_text: str, server: str, *, mountpoint: str | None = None,
         mode: str | None = None, password: str | None = None,
         tls_certificates: str | None = None, attach: bool = True,
         on_behalf_of: str | None = None) -> LinkState:
    """Link the disk `key_text` names in `mode`, attach it and (with a mountpoint) mount it.
    On any failure everything done so far is undone and LinkError says why."""
    try:
        key = parse_key(key_text)
    except ValueError as e:
        raise LinkError(str(e)) from None
    if key.partition is not None and mountpoint is None:
        raise LinkError(f"{key}: a partition can only be named with a mount point")
    found = resolve(key_text, server, tls_certificates)
    existing = _load(key.name)
    if existing is not None:
        alive = existing.keeper is not None and existing.keeper.alive()
        raise LinkError(f"{key.name} is already linked here"
                        f"{'' if alive else ' (its link was lost)'}: "
                        f"minidisk unlink {key.name} first", 17)
    state = LinkState(disk=found["disk"], server=found["server"], export=found["export"],
                      mode=(mode or "R").upper(), partition=key.partition,
                      on_behalf_of=on_behalf_of or "", linked_at=time.time())
    _start_keeper(state, password, tls_certificates, on_behalf_of)
    try:
        if attach:
            _attach_and_mount(state, key, mountpoint, tls_certificates)
    except BaseException:
        with contextlib.suppress(LinkError):
            unlink(state.disk)
        raise
    return state


def _start_keeper(state: LinkState, password: str | None, tls_certificates: str | None,
                  on_behalf_of: str | None) -> None:
    argv = [sys.executable, "-m", "minidisk.link.keeper", "--server", state.server,
            "--disk", state.disk, "--mode", state.mode]
    if password is not None:
        argv.append("--password-on-stdin")
    if tls_certificates:
        argv += ["--tls-certificates", tls_certificates]
    if on_behalf_of:
        argv += ["--on-behalf-of", on_behalf_of]
    state_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(state_dir() / f"{state.disk}.keeper.log", "ab") as log_out:
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
        raise LinkError(f"the link keeper failed (exit {keeper.returncode}); see "
                        f"{state_dir() / (state.disk + '.keeper.log')}") from None
    if not answer.get("ok"):
        keeper.wait()
        raise LinkError(str(answer.get("error")), int(answer.get("errno") or 0))
    state.keeper = Helper.of("link keeper", keeper.pid)
    keeper.returncode = 0  # it outlives us; init reaps it (as attach does with nbdfuse)
    state.access = str(answer["access"])
    state.degraded = bool(answer["degraded"])
    _save(state)


def _attach_and_mount(state: LinkState, key: DiskKey, mountpoint: str | None,
                      tls_certificates: str | None) -> None:
    try:
        attachment = attach_export(nbd_uri(state.server, state.export, tls_certificates),
                                          read_only=state.read_only)
    except KernelError as e:
        raise LinkError(f"attach: {e}") from None
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
        raise LinkError(f"mount: {e}") from None
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
    raise LinkError(f"{device} has no partition {number}")


def _detect_in_window(device: str, start: int, size: int) -> str | None:
    """The file-system type blkid finds in bytes [start, start+size) of `device`, or None."""
    done = run(["blkid", "-p", "-o", "value", "-s", "TYPE", "-O", str(start), "-S", str(size),
                device], ok_codes=(0, 2))
    return done.stdout.strip() or None


def _load(disk: str) -> LinkState | None:
    try:
        return LinkState.from_json(_state_path(disk).read_text())
    except FileNotFoundError:
        return None


def find(target: str) -> LinkState:
    """The link `target` names: `owner.disk` or the mount point it is mounted on."""
    with contextlib.suppress(ValueError):
        state = _load(parse_key(target, partition=False).name)
        if state is not None:
            return state
    real = os.path.realpath(target)
    for state in links():
        if state.mountpoint and state.mountpoint == real:
            return state
    raise LinkError(f"{target}: not linked here (no state in {state_dir()})", 2)


@contextlib.contextmanager
def _locked(disk: str) -> Iterator[LinkState]:
    """The state of `disk` under an exclusive lock, so two unlinks never race."""
    path = _state_path(disk)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise LinkError(f"{disk}: not linked here", 2) from None
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_nlink == 0:
            raise LinkError(f"{disk} was unlinked meanwhile", 2)
        yield LinkState.from_json(f.read())


def unlink(target: str) -> LinkState:
    """Umount, detach, unlock — in that order, each only if still needed, stopping at the
    first step that fails (state kept, so running unlink again finishes the job)."""
    disk = find(target).disk
    with _locked(disk) as state:
        if state.mountpoint:
            if kernel_mount.mounted_at(state.mountpoint):
                try:
                    kernel_mount.umount(state.mountpoint)
                except KernelError as e:
                    raise LinkError(f"umount {state.mountpoint}: {e}") from None
            state.mountpoint = ""
            _save(state)
        if state.device:
            try:
                detach_device(state.device)
            except NotAttachedError:
                pass
            except KernelError as e:
                raise LinkError(f"detach {state.device}: {e}") from None
            state.device = ""
            _save(state)
        if state.keeper is not None:
            _stop_keeper(state.keeper)
            state.keeper = None
            _save(state)
        with contextlib.suppress(FileNotFoundError):
            _state_path(disk).unlink()
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
        if state.device:
            try:
                kernel_mount.refuse_if_in_use(state.device)
            except KernelError:
                continue  # mounted (or open): still in use
        try:
            ended.append(unlink(state.disk))
        except LinkError as e:
            problems.append(f"{state.disk}: {e}")
    return ended, problems


def _stop_keeper(keeper: Helper) -> None:
    """SIGTERM makes the keeper unlink and exit; it ends the link even if it cannot."""
    if keeper.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(keeper.pid, signal.SIGTERM)
    try:
        keeper.stop(KEEPER_EXIT_GRACE)
    except (TimeoutError, PermissionError) as e:
        raise LinkError(f"the link keeper: {e}") from None
