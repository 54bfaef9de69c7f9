#!/usr/bin/env bash
# Install, then start a local PostgreSQL primary + 2 replicas with the proxy in front (Ctrl-C stops).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/endpoint-proxy demo "$@"
