#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages, then a virtualenv in .venv
# with minidisk and its pinned dependencies. Both README commands and .ci/run start here.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config python3-dev python3-venv   # building pyfuse3 from its sdist
  fuse3 libfuse3-dev                                   # dlmfs, nbdfuse
  libnbd-bin python3-libnbd                            # nbdinfo nbdcopy nbdfuse; nbd module (Debian python only)
  nbdkit qemu-utils fio                                # oracles, interop clients and benchmarks
  e2fsprogs util-linux mount kmod                      # mkfs.ext4, fsck, losetup, mount
  thin-provisioning-tools cryptsetup-bin fdisk        # thin_check, integritysetup, sfdisk
  qemu-system-x86 busybox-static                       # the VM harness (tests/vm)
  nbd-client                                           # compared with ours in the guest
  systemd                                              # systemd-analyze verify of the shipped units
  groff-base man-db                                    # the man pages' lint and rendering
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.minidisk-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi

# A Debian 12 kernel for the VM tests (tests/vm/harness.py): this machine's own kernel has no nbd,
# dm or ocfs2 modules. The package is only downloaded and unpacked into .cache/kernel, never
# installed; virtme-ng finds a kernel's modules under /lib/modules/VERSION only, so that one
# path is a symlink into the cache (the guest sees the host's root, so the link works there).
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
kernel_package() {  # the exact name linux-image-amd64 depends on, e.g. linux-image-6.1.0-57-amd64
  apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
kernel_pkg=$(kernel_package)
if [ -z "$kernel_pkg" ]; then $SUDO apt-get update -q; kernel_pkg=$(kernel_package); fi
[ -n "$kernel_pkg" ] || { echo "bootstrap: linux-image-amd64 names no kernel package" >&2; exit 1; }
kernel_version=${kernel_pkg#linux-image-}
kernel_dir=$PWD/.cache/kernel/$kernel_version
kernel_modules=$kernel_dir/lib/modules/$kernel_version
if [ ! -f "$kernel_dir/boot/vmlinuz-$kernel_version" ] || [ ! -f "$kernel_modules/modules.dep" ]; then
  rm -rf "$kernel_dir.tmp" && mkdir -p "$kernel_dir.tmp/deb"
  # The exact name: a glob would download every version apt knows.
  (cd "$kernel_dir.tmp/deb" && apt-get download -q "$kernel_pkg")
  dpkg -x "$kernel_dir.tmp"/deb/*.deb "$kernel_dir.tmp"
  rm -rf "$kernel_dir.tmp/deb"
  depmod -b "$kernel_dir.tmp" "$kernel_version"  # dpkg -x writes no modules.dep
  rm -rf "$kernel_dir" && mv "$kernel_dir.tmp" "$kernel_dir"
fi
for old in .cache/kernel/*/; do  # a kernel Debian has replaced since: the harness boots one only
  [ "$PWD/${old%/}" = "$kernel_dir" ] || rm -rf "$old"
done
modules=/lib/modules/$kernel_version
if [ "$(readlink "$modules" 2>/dev/null)" != "$kernel_modules" ]; then
  if [ -e "$modules" ] && [ ! -L "$modules" ]; then
    echo "bootstrap: $modules is a real directory (an installed kernel?); leaving it alone" >&2
  else
    $SUDO mkdir -p /lib/modules
    $SUDO ln -sfn "$kernel_modules" "$modules"
  fi
fi
