#!/usr/bin/env bash
# The main job, from a fresh machine: set-up (idempotent), then `minidisk quickstart`.
# Pass --once to tear down at once instead of waiting for Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/minidisk quickstart "$@"
