#!/usr/bin/env bash
# The whole test suite, from a fresh machine: set-up (idempotent), lint, types, then pytest.
# Extra arguments go to pytest (e.g. ./scripts/test.sh tests/nbd -x).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy src tests  # strict (pyproject.toml), tests included
exec .venv/bin/python -m pytest -n 2 -p no:cacheprovider --durations=25 "$@"
