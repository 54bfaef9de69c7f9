#!/usr/bin/env bash
# Make this checkout runnable: system binaries the demo needs (with --test: also what the test
# suite needs), and a .venv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."
for_tests=false
[ "${1:-}" = "--test" ] && for_tests=true

need_apt=()
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/postgres" ] || [ ! -x "$pg_bin/pg_basebackup" ]; then
  need_apt+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || [ -x "${pg_bin:-/nonexistent}/pgbench" ] || need_apt+=(postgresql-contrib)
if $for_tests; then
  # MariaDB server and client for the MySQL-protocol tests; sysbench drives them.
  [ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)
  command -v mariadb >/dev/null 2>&1 || need_apt+=(mariadb-client)
  command -v sysbench >/dev/null 2>&1 || need_apt+=(sysbench)
  # Headless Chromium renders the admin status page in the integration tests.
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
  # etcd is the store of the local Patroni clusters (tests, `demo --patroni`).
  [ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing ${need_apt[*]}; install them (as root: apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root: the local cluster runs servers as this account.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed
# Install again when the project's metadata changed, or when a source the compiled modules are
# built from (endpoint_proxy/compiled.py lists them; mypyc also inlines constants of the
# modules they import) is newer than the last build: a compiled module shadows its source.
rebuild=false
[ -f "$stamp" ] || rebuild=true
if ! $rebuild; then
  compiled_sources=$(.venv/bin/python -c 'import runpy; c = runpy.run_path("endpoint_proxy/compiled.py"); print(" ".join(c["source_path"](m) for m in c["COMPILED"]))')
  # shellcheck disable=SC2086 # one word per file
  if [ -n "$(find pyproject.toml setup.py endpoint_proxy/compiled.py $compiled_sources endpoint_proxy/protocol \
      endpoint_proxy/routing endpoint_proxy/sessioncore endpoint_proxy/drills -newer "$stamp" \
      \( -name '*.py' -o -name pyproject.toml \) 2>/dev/null | head -n 1)" ]; then
    rebuild=true
  fi
fi
if $rebuild; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
if $for_tests; then
  # Patroni (pinned) in a virtualenv of its own that the postgres user can read; idempotent.
  .venv/bin/python -c 'from endpoint_proxy.localcluster.patroni import ensure_patroni; ensure_patroni()'
fi
