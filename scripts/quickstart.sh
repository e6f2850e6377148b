#!/usr/bin/env bash
# The main job, from a fresh machine: set-up (idempotent), then the whole story:
#  1. authorized linking: a daemon serves alice's ext4 disk under a link directory, root is
#     granted R, and a plain `cat /vmlink/root/alice.0191/hello.txt` links, attaches and
#     mounts it on demand (then everything is taken down again);
#  2. the core: a Python memory disk served over NBD, attached as a kernel block device, ext4,
#     mounted, written and read; it stays up until Ctrl-C (--once: tear down right away).
# Act 1 needs the kernel's autofs; on a kernel without it (exit status 3, after one line
# saying so) act 2 still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
status=0
.venv/bin/minidisk quickstart-vmlink --once || status=$?
if [ "$status" -eq 3 ]; then
    echo "==> act 1 left out on this kernel; act 2:"
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
exec .venv/bin/minidisk quickstart "$@"
