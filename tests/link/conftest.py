"""The `site` fixture: a daemon with a directory and a hosted lock manager (link_helpers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests import harness
from tests.harness import MINIDISK, scaled
from tests.link.link_helpers import (
    LEASE,
    MATRIX_DISKS,
    NOBODY,
    OWNER_UID,
    Site,
    free_port,
    make_ext4,
    make_partitioned,
    make_pki,
    running_automounter,
)
from tests.pki import subject

from minidisk import control_client
from minidisk.control_client import ControlError
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.attach import detach
from minidisk.kernel.state import attachments
from minidisk.link import linker
from minidisk.link.directory import Directory
from minidisk.link.modes import parse_link_mode
from minidisk.link.names import parse_key
from minidisk.nbd.tls import client_context


@pytest.fixture
def site(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """A site on a unix socket: principals are uids. alice.0191 is an ext4 image (hello.txt),
    or, parametrised indirectly with "partitioned", an MBR disk with ext4 in two partitions
    (link_helpers.make_partitioned)."""
    with _unix_site(monkeypatch, getattr(request, "param", None) == "partitioned") as running:
        yield running


@pytest.fixture
def leased_site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """The `site`, with a link lease of LEASE seconds (holders renew every LEASE/3)."""
    with _unix_site(monkeypatch, settings=f"link_lease = {LEASE}\n") as running:
        yield running


@contextlib.contextmanager
def _unix_site(monkeypatch: pytest.MonkeyPatch, partitioned: bool = False,
               settings: str = "") -> Iterator[Site]:
    root = _new_root()
    sock = root / "s.sock"
    url = f"unix://{sock}"
    if partitioned:
        make_partitioned(root / "0191.img")
    else:
        make_ext4(root / "0191.img")
    site = Site(root, url, str(sock), root / "directory.sqlite", _env(root, url))

    def ready() -> bool:  # the daemon opens the socket to every user after listening
        return sock.exists() and sock.stat().st_mode & 0o777 == 0o666

    with _running(site, monkeypatch, f'url = "{url}"\n{settings}', f"uid:{OWNER_UID}",
                  [f"uid:{uid}" for uid in (0, NOBODY)], ready):
        yield site


AUTOMOUNT_TIMEOUT = 2  # seconds idle before expiry; the expirer looks every timeout/4


@pytest.fixture
def automounter(site: Site) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`minidisk automount SITE/vmlink --timeout 2`; root may link alice.0191 R, nobody W."""
    site.grant("root", "alice.0191", "R")
    site.grant("nobody", "alice.0191", "W")
    with running_automounter(site, AUTOMOUNT_TIMEOUT) as running:
        yield running


TLS_CLIENTS = ["alice", "bob", "carol", "ops"]
# Certificates whose one CN spells another's whole subject (a CA signs what users ask for).
SPOOFERS = {"fake-alice": subject("alice").removeprefix("CN="),
            "fake-ops": subject("ops").removeprefix("CN=")}


@pytest.fixture
def tls_site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """A site on TCP with --tls=require: principals are client certificate subjects.
    `site.pki[cn]` is the certificate directory of CN=cn,O=minidisk tests for alice (the owner),
    bob and carol (users), ops (the one --admin-subject); `site.pki["anonymous"]` has the CA
    only; `site.pki["fake-alice"]`, `["fake-ops"]` have a CN that reads like their subjects
    (conftest.SPOOFERS). The matrix disks grant bob and carol MW."""
    root = _new_root()
    pki = make_pki(root / "pki", TLS_CLIENTS, bare=SPOOFERS)
    pki["anonymous"] = root / "pki" / "anonymous"
    pki["anonymous"].mkdir()
    shutil.copy(pki["server"] / "ca-cert.pem", pki["anonymous"])
    make_ext4(root / "0191.img")
    for attempt in range(3):  # the free port may be taken before the server binds it
        url = f"tcp://127.0.0.1:{free_port()}"
        site = Site(root, url, "", root / "directory.sqlite", _env(root, url), pki=pki)
        ops = client_context(str(pki["ops"]))

        def ready(url: str = url, ops: ssl.SSLContext = ops) -> bool:
            try:
                control_client.call(url, "exports", tls=ops, timeout=scaled(5))
                return True
            except ControlError:
                return False

        settings = (f'url = "{url}"\ntls = "require"\n'
                    f'tls_certificates = "{pki["server"]}"\n'
                    f'admin_subject = ["{subject("ops")}"]\n')
        try:
            with _running(site, monkeypatch, settings, f"subject:{subject('alice')}",
                          [f"subject:{subject(cn)}" for cn in ("bob", "carol")], ready):
                yield site
                return
        except harness.DidNotStart as e:  # the caller may try again in the same root
            if "in use" not in str(e) or attempt == 2:
                subprocess.run(["rm", "-rf", str(root)], check=False)
                raise
            (root / "directory.sqlite").unlink()


def _new_root() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts, and connections as other uids)")
    root = harness.short_dir("md-link-")
    root.chmod(0o755)  # other uids must reach the socket
    return root


def _env(root: Path, url: str) -> dict[str, str]:
    return {"MINIDISK_DIRECTORY": str(root / "directory.sqlite"),
            "MINIDISK_STATE_DIR": str(root / "state"), "MINIDISK_SERVER": url}


@contextlib.contextmanager
def _running(site: Site, monkeypatch: pytest.MonkeyPatch, settings: str, owner: str,
             matrix_linkers: list[str], ready: Callable[[], bool]) -> Iterator[None]:
    """Write the directory and the server's configuration, start the server, wait until
    `ready()`; afterwards unlink, unmount and detach whatever the test left, stop the server
    and remove the site (not when the server did not start: harness.DidNotStart)."""
    root, url = site.root, site.url
    memory = ", ".join(f'"/alice/{d}=1M"' for d in MATRIX_DISKS)
    (root / "server.toml").write_text(
        settings +
        f'file = ["/alice/0191={root}/0191.img"]\n'
        f"memory = [\"/alice/0192=4M\", {memory}]\n"
        f'dlm = "unix://{root}/dlm.sock"\n'
        f'directory = "{root}/directory.sqlite"\n')
    for name, value in site.env.items():
        monkeypatch.setenv(name, value)
    d = Directory(root / "directory.sqlite")
    d.define_owner("alice", owner)
    for disk in ["0191", "0192", *MATRIX_DISKS]:
        d.define_disk(parse_key(f"alice.{disk}"), url, f"/alice/{disk}")
    for matrix_disk in MATRIX_DISKS:  # both linkers of the matrix may link in every mode
        for principal in matrix_linkers:
            d.grant(principal, parse_key(f"alice.{matrix_disk}"), parse_link_mode("MW"))
    d.close()
    server = harness.start([MINIDISK, "serve", "-s", "--config", str(root / "server.toml")],
                           root / "server.log", lambda _: ready(),
                           env={**os.environ, **site.env})
    try:
        yield
    finally:
        for h in site.holders:
            with contextlib.suppress(OSError, ControlError):
                h.close()
        for state in linker.links():
            with contextlib.suppress(linker.LinkError):
                linker.unlink(state.disk)
        for att in attachments():
            with contextlib.suppress(Exception):
                for where in kernel_mount.mounts_of(att.device):
                    kernel_mount.umount(where, lazy=True)
                detach(att.device)
        server.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
