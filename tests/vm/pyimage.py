"""The checkout's Python on virtio disks, so a guest imports it at block-device speed.

The guest sees the host's root over 9p, and under TCG every 9p round trip is slow: importing
the minidisk CLI took ~56 s that way here, ~11 s from ext4 images on virtio-blk (measured in
one guest, one after the other). Python imports are almost all metadata lookups, which 9p
answers one message at a time and a block device answers from the guest's page cache.

Three read-only ext4 images are built on the host with `mke2fs -d` (no loop device, no
mount): the interpreter's prefix without its own site-packages and test suite (the virtualenv
does not use them), the virtualenv, and the checkout without .git, .cache and .venv (the
editable install's sources and the tests, byte-compiled in the image: _byte_compile). The
first two are kept until the interpreter or the virtualenv changes; the checkout's is made
anew for each guest, so it is the tree as it is now. The guest mounts them over the same
paths, so every path stays valid. The host's .cache (the kernel's modules, through
/lib/modules) is bound back over the image's empty one, so modprobe works after the mounts as
before.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT as CHECKOUT

# The interpreter's prefix (pyenv's, here) and the virtualenv this test run uses.
PREFIX = Path(sys.base_prefix)
VENV = Path(sys.prefix)
SKIPPED = ("site-packages", "test")  # below the stdlib directory: unused by the venv, ~800 MB
NOT_IN_CHECKOUT = (".git", ".cache", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache")
LABELS = ("md-py-prefix", "md-py-checkout", "md-py-venv")  # ext4 labels: at most 16 bytes
# Images of another key are removed only once this old: another run (an xdist worker, a second
# checkout sharing .cache) may be about to boot with its own.
STALE_AFTER_S = 24 * 3600


@dataclass(frozen=True)
class PythonImages:
    disks: tuple[Path, ...]
    mount_script: str  # bash, run first in the guest: mounts them over their host paths

    def vng_args(self) -> list[str]:
        # Not vng's --disk: it attaches images writable, and qemu's write lock then keeps a
        # second guest (another test run) from sharing them. Read-only drives share.
        drives = [f"-drive if=none,id=mdpy{i},file={disk},format=raw,readonly=on "
                  f"-device virtio-blk-pci,drive=mdpy{i}" for i, disk in enumerate(self.disks)]
        return [f"--qemu-opts={' '.join(drives)}"]


def _fingerprint(*trees: Path) -> str:
    """Changes when a tree's top-level entries change (a pip install touches them)."""
    h = hashlib.sha256()
    for tree in trees:
        for entry in sorted(os.scandir(tree), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            h.update(f"{tree}/{entry.name}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    h.update(str(stdlib).encode())
    return h.hexdigest()[:16]


def _image(source: Path, image: Path, label: str, skipped: tuple[Path, ...] = (),
           compiled: tuple[str, ...] = ()) -> None:
    """An ext4 image of `source` (without `skipped` subtrees) labelled `label`, written
    atomically; the `compiled` subtrees (with `skipped`) byte-compiled in the image."""
    staging = image.with_suffix(".staging")
    shutil.rmtree(staging, ignore_errors=True)
    if skipped:
        # mke2fs -d takes one directory whole: copy the tree without the skipped parts.
        ignored = {str(p) for p in skipped}
        shutil.copytree(source, staging, symlinks=True,
                        ignore=lambda d, names: [n for n in names
                                                 if os.path.join(d, n) in ignored])
        for p in skipped:  # keep the directory itself, empty, where Python looks for it
            (staging / p.relative_to(source)).mkdir(parents=True, exist_ok=True)
        for name in compiled:
            _byte_compile(staging / name, source / name)
        tree = staging
    else:
        tree = source.resolve()  # a checkout's .venv may be a link to another's (worktrees)
    used = int(subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    size_mib = used * 2 // (1 << 20) + 64  # room for ext4's metadata and small files' blocks
    partial = image.with_suffix(".partial")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", label,
                    "-d", str(tree),
                    str(partial), f"{size_mib}M"], check=True, capture_output=True)
    partial.rename(image)
    shutil.rmtree(staging, ignore_errors=True)


def _byte_compile(tree: Path, seen_as: Path) -> None:
    """Write `tree`'s __pycache__, naming the sources as the guest sees them (`seen_as`).

    The checkout holds no byte code when PYTHONDONTWRITEBYTECODE is set (it is, in CI's
    environment), and the image is read-only: without this every Python process in the guest
    compiles each minidisk module it imports, at TCG speed. copytree kept the sources' mtimes,
    which the byte code records, so the guest's Python takes it as current."""
    import compileall

    if not compileall.compile_dir(tree, quiet=1, workers=0, stripdir=str(tree),
                                  prependdir=str(seen_as)):
        raise RuntimeError(f"byte-compiling {seen_as} for the guest failed")


def python_images(cache: Path, checkout_image: Path) -> PythonImages:
    """Images of the interpreter and the virtualenv (rebuilt only when either changed) and a
    new one of the checkout at `checkout_image`."""
    cache.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    key = _fingerprint(PREFIX, VENV, VENV / "lib" / stdlib.name / "site-packages")
    prefix_image, venv_image = cache / f"prefix-{key}.img", cache / f"venv-{key}.img"
    # One builder at a time: two workers building the same image would share its staging
    # tree and partial file (both guest units start at once on a fresh clone).
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for old in cache.glob("*-*.img"):
            if (old not in (prefix_image, venv_image)
                    and time.time() - old.stat().st_mtime > STALE_AFTER_S):
                old.unlink(missing_ok=True)
        if not prefix_image.exists():
            _image(PREFIX, prefix_image, LABELS[0], tuple(stdlib / name for name in SKIPPED))
        if not venv_image.exists():
            _image(VENV, venv_image, LABELS[2])
    _image(CHECKOUT, checkout_image, LABELS[1],
           tuple(CHECKOUT / name for name in NOT_IN_CHECKOUT), compiled=("src", "tests"))
    # Without udev there are no /dev/disk/by-* links; mount finds a label by probing itself.
    # The checkout's image hides the host's .cache, where the kernel's modules (through
    # /lib/modules) and the kernel live: it is bound back over the image's empty .cache.
    cache = CHECKOUT / ".cache"
    lines = ["modprobe virtio_blk", "modprobe ext4", "mkdir -p /tmp/.md-host-cache",
             f"mount --bind {cache} /tmp/.md-host-cache || exit 97"]
    for label, target in zip(LABELS, (PREFIX, CHECKOUT, VENV), strict=True):
        lines.append(f"mount -o ro,noatime LABEL={label} {target} || exit 97")
    lines.append(f"mount --bind /tmp/.md-host-cache {cache} || exit 97")
    return PythonImages((prefix_image, checkout_image, venv_image), "\n".join(lines) + "\n")
