"""`minidisk quickstart`: the whole core story on one machine, then a clean teardown.

Serve a 128 MiB memory disk over NBD, attach it as a kernel block device, make an ext4
file system, mount it, write and read back a file, show the device's status, wait for
Ctrl-C (or not, with --once), and take everything down again in reverse order: nothing is
left mounted, attached or listening afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from minidisk import control_client
from minidisk.cli.common import fail
from minidisk.cli.demo import halt_server, step, wait_for_ctrl_c
from minidisk.cli.progress import Progress
from minidisk.kernel import mount as kernel_mount
from minidisk.kernel.attach import attach, detach
from minidisk.namespace.sizes import SizeError, parse_size


@contextlib.contextmanager
def _server(workdir: Path, size: str) -> Iterator[str]:
    sock = workdir / "server.sock"
    url = f"unix://{sock}"
    subprocess.run([sys.executable, "-m", "minidisk", "serve", "--memory", f"disk={size}",
                    "--log-file", str(workdir / "server.log"), url], check=True)
    try:
        yield url
    finally:
        halt_server(url, sock)


@contextlib.contextmanager
def _attached(uri: str) -> Iterator[str]:
    attachment = attach(uri)
    try:
        yield attachment.device
    finally:
        step(f"detaching {attachment.device}")
        detach(attachment.device)


@contextlib.contextmanager
def _mounted(device: str, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir()
    kernel_mount.mount(device, mountpoint, fstype="ext4")
    try:
        yield mountpoint
    finally:
        step(f"unmounting {mountpoint}")
        kernel_mount.umount(mountpoint)


def _write_and_read(mountpoint: Path) -> None:
    path = mountpoint / "hello.bin"
    payload = b"hello from a Python block device\n" + os.urandom(8 << 20)
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:  # drop the cached pages so the read really goes through the device
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != hashlib.sha256(payload).hexdigest():
        raise click.ClickException(f"read back different data from {path}")
    step(f"wrote and read back {path} ({len(payload)} bytes, sha256 {digest[:16]}…)")


def _status(url: str, device: str, mountpoint: Path) -> None:
    exports = control_client.call(url, "exports")["exports"]
    for export in exports:
        click.echo(f"    export {export['name']}: {export['description']}")
    usage = shutil.disk_usage(mountpoint)
    click.echo(f"    {device} mounted at {mountpoint}: ext4, {usage.total >> 20} MiB, "
               f"{usage.used >> 20} MiB used")


@click.command()
@click.option("--once", is_flag=True, help="Tear down right away instead of waiting.")
@click.option("--size", default="128M", show_default=True, help="Size of the memory disk.")
def quickstart(once: bool, size: str) -> None:
    """Serve a memory disk, attach it, mkfs.ext4, mount, write and read, show status."""
    try:  # before anything is started: the server's own refusal would come with a traceback
        parse_size(size)
    except SizeError as e:
        fail(f"--size {e}", code=2)
    if os.geteuid() != 0:
        raise click.ClickException("quickstart attaches and mounts devices: run it as root")
    workdir = Path(tempfile.mkdtemp(prefix="minidisk-quickstart-"))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with _server(workdir, size) as url:
            uri = f"nbd+unix:///disk?socket={workdir / 'server.sock'}"
            step(f"serving a {size} memory disk at {url} (export 'disk')")
            with _attached(uri) as device:
                step(f"attached {uri} as {device}")
                with Progress(f"making an ext4 file system on {device}"):
                    kernel_mount.mkfs(device, "ext4", label="minidisk")
                step(f"made an ext4 file system on {device}")
                with _mounted(device, workdir / "mnt") as mountpoint:
                    step(f"mounted {device} at {mountpoint}")
                    _write_and_read(mountpoint)
                    _status(url, device, mountpoint)
                    if not once:
                        wait_for_ctrl_c(
                            f"{mountpoint} is yours; press Ctrl-C to tear everything down")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step("done: nothing is left mounted, attached or listening")


def register(cli: click.Group) -> None:
    cli.add_command(quickstart)
