"""Helpers for the link tests (imported by name: conftest.py puts this directory on
sys.path). A linking site for tests: a daemon with a directory, a hosted lock manager, an owner
(alice, uid 1000) with disks, and helpers to act as other identities.

Identities on one machine: the test process is root; `as_uid(65534)` switches the effective
uid around a connect(), and SO_PEERCRED records the effective uid at connect time, so one
process holds control connections (and links) of several principals. Processes that must run
as another user (nbdinfo, libnbd) run under `setpriv` from /usr/bin, which every user can
execute (the venv's interpreter lives under /root and cannot).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import MINIDISK

from minidisk.daemon.control import ControlError, Session
from minidisk.link.directory import Directory

OWNER_UID = 1000
NOBODY = 65534
# Disks for the mode matrix: one fresh disk per pair, so no pair waits for the last to end.
MATRIX_DISKS = [f"{n:04x}" for n in range(0x100, 0x100 + 12 * 12)]


@contextlib.contextmanager
def as_uid(uid: int) -> Iterator[None]:
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


class Holder:
    """One control connection of one principal: at most one link, alive while it is open."""

    def __init__(self, url: str, uid: int) -> None:
        with as_uid(uid):
            self.session = Session(url, timeout=30)

    def link(self, disk: str, mode: str, password: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"disk": disk, "mode": mode}
        if password is not None:
            args["password"] = password
        return self.session.call("link", args)

    def close(self) -> None:
        self.session.close()


@dataclass
class Site:
    root: Path
    url: str
    socket: str
    directory_path: Path
    env: dict[str, str]
    holders: list[Holder] = field(default_factory=list)

    def directory(self) -> Directory:
        return Directory(self.directory_path)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def holder(self, uid: int) -> Holder:
        h = Holder(self.url, uid)
        self.holders.append(h)
        return h

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MINIDISK, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.env}, check=check)

    def audit(self) -> list[tuple[str, str, str, str, str]]:
        d = self.directory()
        try:
            return [(e.who, e.action, e.disk, e.outcome, e.why) for e in d.audit_log()]
        finally:
            d.close()

    def wait_linkable(self, disk: str, mode: str = "W", uid: int = NOBODY,
                      timeout: float = 10.0) -> Holder:
        """Link `disk` as soon as nothing is in the way (a link ends asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.holder(uid)
            try:
                h.link(disk, mode)
                return h
            except ControlError as e:
                h.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"{disk} never became linkable {mode}: {e}") from None
                time.sleep(0.05)


def as_user(uid: int, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a system tool (from /usr/bin) as `uid`."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "LANG": "C"})


def make_ext4(image: Path, size: str = "32M") -> None:
    content = Path(tempfile.mkdtemp(prefix="md-content-"))
    try:
        (content / "hello.txt").write_text("hello from alice's 0191\n")
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(content)], check=True)


