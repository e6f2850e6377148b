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
  openssl etcd-server thin-provisioning-tools cryptsetup-bin fdisk
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts etcd on :2379 when it is installed; tests start their own on free ports.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true; fi
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
