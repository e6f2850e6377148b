"""Another server's export as a device (--nbd), and the kernel path end to end."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests import harness
from tests.daemon.conftest import Server
from tests.harness import nbdinfo_json, need_root, run_cli


def _qemu_io(uri: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    done = subprocess.run([*argv, uri], capture_output=True, text=True)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done


def test_remote_export_is_a_device(serve: Server, short_tmp: Path) -> None:
    upstream = short_tmp / "nbdkit.sock"
    nbdkit = harness.start(["nbdkit", "-f", "-U", str(upstream), "memory", "16M"],
                           short_tmp / "nbdkit.log", harness.accepting(upstream))
    try:
        up_uri = f"nbd+unix:///?socket={upstream}"
        _qemu_io(up_uri, "write -P 0x11 0 64k")
        sock = serve("--nbd", f"remote={up_uri}")
        uri = f"nbd+unix:///remote?socket={sock}"
        info = nbdinfo_json(uri)["exports"][0]
        assert info["export-size"] == 16 << 20 and info["can_trim"] is True
        _qemu_io(uri, "read -P 0x11 0 64k", "write -P 0x22 1M 128k", "write -z 0 4k",
                 "discard 8M 1M", "flush")
        _qemu_io(up_uri, "read -P 0x22 1M 128k", "read -P 0 0 4k", "read -P 0x11 4k 60k")
        # Holes of the upstream export are holes here too (block status passes through).
        mapping = subprocess.run(["nbdinfo", "--map", uri], capture_output=True, text=True,
                                 check=True).stdout
        assert "hole" in mapping and "data" in mapping
    finally:
        nbdkit.kill()  # SIGTERM would wait for our server's connection to close


def test_remote_export_refused_names_the_problem(short_tmp: Path) -> None:
    done = run_cli("serve", "--nbd", f"r=nbd+unix:///x?socket={short_tmp}/none.sock",
                   f"unix://{short_tmp}/s.sock")
    assert done.returncode == 1 and "none.sock" in done.stderr


def test_kernel_path_ext4_on_a_minidisk_device(serve: Server, short_tmp: Path) -> None:
    need_root()
    sock = serve("--memory", "disk=256M")
    uri = f"nbd+unix:///disk?socket={sock}"
    attached = run_cli("attach", uri)
    assert attached.returncode == 0, attached.stderr
    device = attached.stdout.strip()
    mnt = short_tmp / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(mnt)], check=True)
        mounted = True
        digests = {}
        for i in range(5):  # 50 MiB of files
            data = os.urandom(10 << 20)
            (mnt / f"f{i}").write_bytes(data)
            digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
        subprocess.run(["umount", str(mnt)], check=True)
        mounted = False
        fsck = subprocess.run(["fsck.ext4", "-f", "-n", device], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        subprocess.run(["mount", "-o", "ro", device, str(mnt)], check=True)
        mounted = True
        subprocess.run(["blockdev", "--flushbufs", device], check=True)
        for name, digest in digests.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        detached = run_cli("detach", device)
    assert detached.returncode == 0, detached.stderr
    assert device not in subprocess.run(["losetup", "-a"], capture_output=True,
                                        text=True).stdout.split(":")[0::2]


def test_quickstart_once_leaves_nothing_behind() -> None:
    need_root()
    done = run_cli("quickstart", "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for step in ("serving a 128M memory disk", "attached", "made an ext4 file system",
                 "mounted", "wrote and read back", "export disk:", "unmounting", "detaching",
                 "halting", "nothing is left"):
        assert step in out, out
    workdir = out.split("socket=")[1].split("/server.sock")[0]
    assert not Path(workdir).exists()
    assert workdir not in Path("/proc/self/mounts").read_text()
    assert workdir not in subprocess.run(["losetup", "-a"], capture_output=True,
                                         text=True).stdout
