"""`minidisk quickstart-vmlink`: the link story on one machine, then a clean teardown.

The administrator's side: a daemon serving alice's disk 0191 (a host file with ext4 on it),
with a directory and a lock manager; alice defined as its owner; root granted R on it. The
user's side: the automounter on a private /vmlink, and a plain `cat` of
/vmlink/root/alice.0191/hello.txt (root's own subtree: every user has one, see
minidisk.link.automount) — which links, attaches and mounts the disk on the way. Then
everything is taken down in reverse: automounter (unmount, detach, unlink), server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click

from minidisk.cli.common import fail
from minidisk.cli.demo import halt_server, step, wait_for_ctrl_c
from minidisk.link.autofs import NO_AUTOFS, kernel_has_autofs
from minidisk.link.directory import Directory
from minidisk.link.modes import parse_link_mode
from minidisk.link.names import parse_key


@contextlib.contextmanager
def _server(workdir: Path, env: dict[str, str]) -> Iterator[str]:
    image = workdir / "alice-0191.img"
    content = workdir / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from alice's 0191, linked on demand\n")
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    url = f"unix://{workdir / 'server.sock'}"
    (workdir / "server.toml").write_text(
        f'url = "{url}"\nfile = ["/alice/0191={image}"]\n'
        f'dlm = "unix://{workdir / "dlm.sock"}"\ndirectory = "{workdir / "directory.sqlite"}"\n')
    Directory(workdir / "directory.sqlite").close()  # serve --directory wants an existing one
    subprocess.run([sys.executable, "-m", "minidisk", "serve", "--config",
                    str(workdir / "server.toml"), "--log-file", str(workdir / "server.log")],
                   env=env, check=True)
    try:
        yield url
    finally:
        halt_server(url, workdir / "server.sock")


@contextlib.contextmanager
def _automounter(root: Path, env: dict[str, str]) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-m", "minidisk", "automount", "-f", str(root),
                             "--timeout", "60"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not _autofs_at(root):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException("the automounter did not start")
            time.sleep(0.05)
        yield
    finally:
        step("stopping the automounter: it unmounts, detaches and unlinks what it linked")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _autofs_at(root: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(root) for line in f)


# The exit status when this kernel has no autofs: scripts/quickstart.sh goes on to act 2.
NO_AUTOFS_STATUS = 3


@click.command(name="quickstart-vmlink")
@click.option("--once", is_flag=True, help="Tear down right away instead of waiting.")
def quickstart_vmlink(once: bool) -> None:
    """Serve alice's disk, grant it, and read a file by entering /vmlink/alice.0191."""
    if os.geteuid() != 0:
        raise click.ClickException("the demo attaches and mounts devices: run it as root")
    if not kernel_has_autofs():
        fail(NO_AUTOFS.format(release=os.uname().release), code=NO_AUTOFS_STATUS)
    workdir = Path(tempfile.mkdtemp(prefix="minidisk-vmlink-", dir="/tmp"))
    workdir.chmod(0o755)
    env = {**os.environ, "MINIDISK_DIRECTORY": str(workdir / "directory.sqlite"),
           "MINIDISK_STATE_DIR": str(workdir / "state"),
           "MINIDISK_SERVER": f"unix://{workdir / 'server.sock'}"}
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with _server(workdir, env) as url:
            step(f"serving alice's disk 0191 (ext4 in {workdir / 'alice-0191.img'}) at {url}")
            directory = Directory(workdir / "directory.sqlite")
            directory.define_owner("alice", "uid:1000")
            directory.define_disk(parse_key("alice.0191"), url, "/alice/0191")
            directory.grant("uid:0", parse_key("alice.0191"), parse_link_mode("R"))
            directory.close()
            step("directory: owner alice (uid 1000), disk alice.0191, grant root R")
            root = workdir / "vmlink"
            with _automounter(root, env):
                step(f"automounting {root}")
                path = root / "root" / "alice.0191" / "hello.txt"
                done = subprocess.run(["cat", str(path)], capture_output=True, text=True,
                                      timeout=60)
                if done.returncode != 0:
                    raise click.ClickException(f"cat {path}: {done.stderr.strip()}")
                step(f"cat {path}: {done.stdout.strip()}")
                mounts = [line.split()[4] for line in open("/proc/self/mountinfo")
                          if str(root) + "/" in line.split()[4]
                          and line.split(" - ")[1].split()[0] != "autofs"]
                step(f"linked R and mounted read-only at {', '.join(mounts)}")
                if not once:
                    wait_for_ctrl_c("press Ctrl-C to tear everything down")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step("done: nothing is left mounted, attached, locked or listening")


def register(cli: click.Group) -> None:
    cli.add_command(quickstart_vmlink)
