"""The `site` fixture: a daemon with a directory and a hosted lock manager (link_helpers)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from link_helpers import MATRIX_DISKS, MINIDISK, NOBODY, OWNER_UID, Site, make_ext4  # noqa: E402

from minidisk.daemon.control import ControlError  # noqa: E402
from minidisk.kernel import mount as kernel_mount  # noqa: E402
from minidisk.kernel.attach import detach  # noqa: E402
from minidisk.kernel.state import attachments  # noqa: E402
from minidisk.link import linker  # noqa: E402
from minidisk.link.directory import Directory  # noqa: E402
from minidisk.link.modes import parse_link_mode  # noqa: E402
from minidisk.link.names import parse_key  # noqa: E402


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts, and connections as other uids)")
    root = Path(tempfile.mkdtemp(prefix="md-link-", dir="/tmp"))
    root.chmod(0o755)  # other uids must reach the socket
    sock = root / "s.sock"
    url = f"unix://{sock}"
    make_ext4(root / "0191.img")
    memory = ", ".join(f'"/alice/{d}=1M"' for d in MATRIX_DISKS)
    (root / "server.toml").write_text(
        f'url = "{url}"\n'
        f'file = ["/alice/0191={root}/0191.img"]\n'
        f"memory = [\"/alice/0192=4M\", {memory}]\n"
        f'dlm = "unix://{root}/dlm.sock"\n'
        f'directory = "{root}/directory.sqlite"\n')
    env = {"MINIDISK_DIRECTORY": str(root / "directory.sqlite"),
           "MINIDISK_STATE_DIR": str(root / "state"), "MINIDISK_SERVER": url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    d = Directory(root / "directory.sqlite")
    d.define_owner("alice", f"uid:{OWNER_UID}")
    for disk in ["0191", "0192", *MATRIX_DISKS]:
        d.define_disk(parse_key(f"alice.{disk}"), url, f"/alice/{disk}")
    for matrix_disk in MATRIX_DISKS:  # both linkers of the matrix may link in every mode
        for uid in (0, NOBODY):
            d.grant(f"uid:{uid}", parse_key(f"alice.{matrix_disk}"), parse_link_mode("MW"))
    d.close()
    server = subprocess.Popen([MINIDISK, "serve", "-s", "--config", str(root / "server.toml")],
                              stderr=open(root / "server.log", "wb"),
                              env={**os.environ, **env})
    site = Site(root, url, str(sock), root / "directory.sqlite", env)
    try:
        deadline = time.monotonic() + 20
        # Ready once the daemon has opened the socket to every user (after listening).
        while not sock.exists() or sock.stat().st_mode & 0o777 != 0o666:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.02)
        yield site
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
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)
