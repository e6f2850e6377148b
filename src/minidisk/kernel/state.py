"""Per-attachment state, so that `detach` (another process, later) can find what `attach` made.

Layout under the state directory (privatedir.state_root(): $MINIDISK_STATE_DIR, else
/run/minidisk for root):

    attach/<dev>.json     one file per attachment, named after the kernel device (loop3, nbd0)
    attach/<id>/          private work directory (mode 0700) of an nbdfuse attachment:
        export            the naked FUSE mount point = the loop device's backing file
        nbdfuse.pid       written by nbdfuse once it serves
        nbdfuse.log       nbdfuse's stderr, quoted in errors

A state file is written atomically (temporary file and rename) and removed last, so while it
exists a retried `detach` can still finish the steps that remain.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minidisk.kernel.commands import Helper
from minidisk.kernel.errors import NotAttachedError
from minidisk.privatedir import private_dir, state_root

STATE_VERSION = 1


def state_dir() -> Path:
    return state_root() / "attach"


@dataclass
class Attachment:
    device: str  # /dev/loop3, /dev/nbd0
    method: str  # "nbdfuse", "netlink" or "ioctl"
    uri: str
    read_only: bool
    workdir: str = ""  # nbdfuse only
    backing_file: str = ""  # nbdfuse only: what the loop device must still point at
    nbd_index: int = -1  # kernel nbd only
    helpers: list[Helper] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def name(self) -> str:
        return os.path.basename(self.device)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Attachment:
        raw = json.loads(text)
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {raw.get('version')!r}")
        raw["helpers"] = [Helper(**h) for h in raw.get("helpers", [])]
        return cls(**raw)


def state_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def save(attachment: Attachment) -> None:
    private_dir(state_dir())  # root acts on what it says later: no user may plant it
    final = state_path(attachment.name)
    tmp = final.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(attachment.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


@contextlib.contextmanager
def locked(name: str) -> Iterator[Attachment]:
    """Load the state of device `name` holding an exclusive lock, so two detaches never race.

    The lock is on the state file itself; a detach that waited on it finds the file unlinked
    (st_nlink 0) once the first one is done and reports "not attached".
    """
    path = state_path(name)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise NotAttachedError(
            f"/dev/{name} was not attached by minidisk (no state in {state_dir()})") from None
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if os.fstat(f.fileno()).st_nlink == 0:
            raise NotAttachedError(f"/dev/{name} was detached meanwhile")
        try:
            attachment = Attachment.from_json(f.read())
        except (ValueError, TypeError, KeyError) as e:
            raise NotAttachedError(f"state file {path} is unreadable: {e}") from None
        yield attachment


def remove(attachment: Attachment) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(attachment.name).unlink()


def attachments() -> list[Attachment]:
    """Every attachment with a state file (for status displays and cleanup tools)."""
    found = []
    for path in sorted(state_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            found.append(Attachment.from_json(path.read_text()))
    return found
