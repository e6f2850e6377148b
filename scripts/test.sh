#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up (idempotent), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest -n 2 "$@"
