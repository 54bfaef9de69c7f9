#!/usr/bin/env bash
# Install what the suite needs, then run all of it: lint, types, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
.venv/bin/ruff check endpoint_proxy tests benchmarks
.venv/bin/mypy
exec .venv/bin/pytest "$@"
