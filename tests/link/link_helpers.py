"""Helpers for the link tests. A linking site for tests: a daemon with a directory, a hosted
lock manager, an owner (alice, uid 1000) with disks, and helpers to act as other identities.

Identities on one machine: the test process is root; `as_uid(65534)` switches the effective
uid around a connect(), and SO_PEERCRED records the effective uid at connect time, so one
process holds control connections (and links) of several principals. Processes that must run
as another user (nbdinfo, libnbd) run under `setpriv` from /usr/bin, which every user can
execute (the venv's interpreter lives under /root and cannot).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import harness
from tests.harness import MINIDISK, scaled
from tests.pki import Authority

from minidisk.control_client import ControlConnection, ControlError
from minidisk.link.directory import Directory
from minidisk.link.modes import parse_link_mode
from minidisk.link.names import parse_key, parse_principal
from minidisk.nbd.tls import client_context

OWNER_UID = 1000
NOBODY = 65534
# Disks for the mode matrix: one fresh disk per pair, so no pair waits for the last to end.
MATRIX_DISKS = [f"{n:04x}" for n in range(0x100, 0x100 + 12 * 12)]
LEASE = 2  # seconds: the link lease of the `leased_site` fixture


@contextlib.contextmanager
def as_uid(uid: int) -> Iterator[None]:
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


class Holder:
    """One control connection of one principal: at most one link, alive while it is open.
    The principal is `uid` on a unix socket, or the subject of the client certificate in the
    certificate directory `tls` on TCP."""

    def __init__(self, url: str, uid: int = 0, tls: Path | None = None) -> None:
        context = client_context(str(tls)) if tls is not None else None
        with as_uid(uid):
            self.session = ControlConnection(url, context, timeout=scaled(30))

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
    # A TLS site: certificate directories by common name (`pki["bob"]`: bob's client
    # certificate, in the nbdkit layout); empty for a unix-socket site.
    pki: dict[str, Path] = field(default_factory=dict)

    def directory(self) -> Directory:
        return Directory(self.directory_path)

    def grant(self, who: str, disk: str, mode: str) -> None:
        """`minidisk directory grant WHO DISK --mode MODE`, made in this process: the CLI's
        own tests run it as a command; elsewhere (in a TCG guest above all) a process start
        costs seconds for nothing."""
        d = self.directory()
        try:
            d.grant(parse_principal(who), parse_key(disk, partition=False),
                    parse_link_mode(mode))
        finally:
            d.close()

    def uri(self, export: str, who: str | None = None) -> str:
        """The export's NBD URI; on a TLS site, with `who`'s certificates."""
        if self.pki:
            port = self.url.rsplit(":", 1)[1].strip("/")
            query = f"?tls-certificates={self.pki[who]}" if who else ""
            return f"nbds://127.0.0.1:{port}/{export}{query}"
        return f"nbd+unix:///{export}?socket={self.socket}"

    def holder(self, uid: int) -> Holder:
        h = Holder(self.url, uid)
        self.holders.append(h)
        return h

    def tls_holder(self, who: str) -> Holder:
        """A control connection with `who`'s client certificate (principal CN=who,O=...)."""
        h = Holder(self.url, tls=self.pki[who])
        self.holders.append(h)
        return h

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MINIDISK, *args], capture_output=True, text=True, timeout=scaled(60),
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
        deadline = time.monotonic() + scaled(timeout)
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
                           *argv], capture_output=True, text=True, timeout=scaled(timeout),
                          env={"PATH": "/usr/bin:/bin", "LANG": "C"})


def make_ext4(image: Path, size: str = "32M") -> None:
    content = Path(tempfile.mkdtemp(prefix="md-content-"))
    try:
        (content / "hello.txt").write_text("hello from alice's 0191\n")
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    finally:
        subprocess.run(["rm", "-rf", str(content)], check=True)




def make_partitioned(image: Path) -> None:
    """A 24 MiB disk with an MBR (real sfdisk) and two partitions, ext4 in both, made in place
    with mke2fs -E offset=: p1.txt only in partition 1, p2.txt only in partition 2."""
    subprocess.run(["truncate", "-s", "24M", str(image)], check=True)
    subprocess.run(["sfdisk", "-q", str(image)], check=True, text=True,
                   input="label: dos\nstart=2048, size=8192, type=83\n"
                         "start=10240, type=83\n")
    for number, (start, sectors) in enumerate([(2048, 8192), (10240, 49152 - 10240)], 1):
        content = Path(tempfile.mkdtemp(prefix="md-content-"))
        try:
            (content / f"p{number}.txt").write_text(f"partition {number} of alice's 0191\n")
            subprocess.run(["mke2fs", "-t", "ext4", "-q", "-F", "-E", f"offset={start * 512}",
                            "-d", str(content), str(image), f"{sectors // 2}k"], check=True)
        finally:
            subprocess.run(["rm", "-rf", str(content)], check=True)


def make_pki(directory: Path, clients: list[str],
             bare: dict[str, str] | None = None) -> dict[str, Path]:
    """A CA (tests/pki.py); `directory/server` (ca-cert.pem, server-cert.pem, server-key.pem)
    and, for each client CN, `directory/CN` (ca-cert.pem, client-cert.pem, client-key.pem).
    `bare` maps more directory names to a CN that is the certificate's whole subject (no O):
    any text a CA might sign."""
    authority = Authority("minidisk link test CA")
    dirs = {"server": directory / "server"}
    authority.issue(dirs["server"], "localhost", "server")
    for cn in clients:
        dirs[cn] = directory / cn
        authority.issue(dirs[cn], cn, "client")
    for where, cn in (bare or {}).items():
        dirs[where] = directory / where
        authority.issue(dirs[where], cn, "client", organization=False)
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def autofs_mounted(root: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(root) and " autofs " in line for line in f)


def run_ls(path: Path) -> subprocess.CompletedProcess[str]:
    """`ls PATH` in another process group than the automounter's: its lookups are trapped."""
    return subprocess.run(["ls", str(path)], capture_output=True, text=True, timeout=scaled(60))


def mount_options(path: Path) -> list[str]:
    """The options of what is mounted exactly at `path` ([] if nothing is): from mountinfo
    only, because a path walk below an automounted key counts as use and postpones expiry."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                return fields[5].split(",")
    return []


@contextlib.contextmanager
def running_automounter(site: Site, timeout: int = 2, **env: str
                        ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`minidisk automount SITE/vmlink --timeout T` (`env` added to the site's), stopped
    afterwards."""
    root = site.root / "vmlink"
    # The expiry is scaled too: where every step is slower, a mount must outlive the steps
    # a test takes before it looks at it.
    automounter = harness.start([MINIDISK, "-v", "automount", "-f", str(root), "--timeout",
                                 str(round(scaled(timeout)))], site.root / "automount.log",
                                lambda _: autofs_mounted(root),
                                env={**os.environ, **site.env, **env}, new_session=True)
    try:
        yield automounter.proc, root
    finally:
        if automounter.alive():
            os.kill(automounter.pid, signal.SIGCONT)  # a test may have stopped it
        automounter.stop(30)
        if autofs_mounted(root):
            subprocess.run(["umount", "-l", str(root)], check=False)


# Run by /usr/bin/python3 (libnbd): connect to argv[1], report read-only or read-write, and
# try a WRITE with strict mode off, so the server, not libnbd, must refuse it.
WRITE_AS_CLIENT = """
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # send the WRITE anyway: the server must refuse it
h.set_uri_allow_local_file(True)  # tls-certificates=DIR, as nbdinfo allows it
h.connect_uri(sys.argv[1])
print("read-only" if h.is_read_only() else "read-write")
try:
    h.pwrite(b"x" * 512, 0)
    print("written")
except nbd.Error as e:
    print("refused", errno.errorcode.get(e.errno, e.errno))
"""


def second_link_outcome(linker: Any, disk: str, first: str, second: str, holder: str) -> str:
    """Link `disk` in mode `second` beside `holder`'s `first` link: "write", "read" or
    "refused". LINK never waits; a refusal must say which link is in the way, and only WR
    and MR may degrade to read."""
    try:
        result = linker.link(disk, second)
    except ControlError as e:
        assert e.errno == 16 and f"linked {first} by {holder}" in str(e), str(e)  # EBUSY
        return "refused"
    got = "write" if result["access"] == "read-write" else "read"
    assert result["degraded"] == (second in ("WR", "MR") and got == "read")
    return str(got)
