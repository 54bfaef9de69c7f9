#!/usr/bin/env bash
# Install what the scripts in benchmarks/ need: the comparison targets
# (PgBouncer, HAProxy), the load generators (pgbench, sysbench) and the MariaDB
# server of sysbench_compare.py, and make sure the Debian packages' own services
# are not running: the benchmarks start their own instances on free loopback
# ports.
#
# Idempotent: installs only what is missing, runs `apt-get update` only when
# an install is needed. Needs root (or sudo) for the install step.
#
# --pgbouncer-source: also build PgBouncer from Debian 13's source package
# (1.24) into benchmarks/.pgbouncer. Debian 12 ships 1.18, which has no
# max_prepared_statements (1.21+): pool_compare.py's pgbouncer-prepared target
# needs the newer one, and the scripts prefer benchmarks/.pgbouncer when it is
# there.
set -euo pipefail

build_pgbouncer=false
for arg in "$@"; do
    case "$arg" in
        --pgbouncer-source) build_pgbouncer=true ;;
        *) echo "setup.sh: unknown argument $arg (known: --pgbouncer-source)" >&2; exit 2 ;;
    esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
command -v pgbouncer >/dev/null 2>&1 || missing+=(pgbouncer)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if ! command -v pgbench >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
    missing+=(postgresql-contrib)
fi
if ! command -v psql >/dev/null 2>&1; then
    missing+=(postgresql-client)
fi
command -v sysbench >/dev/null 2>&1 || missing+=(sysbench)
new_mariadb=0
if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
    missing+=(mariadb-server mariadb-client)
    new_mariadb=1
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists when they are absent or the install fails.
    if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    fi
else
    echo "setup.sh: pgbouncer, haproxy, sysbench and mariadb already installed"
fi

# The packages start their own daemons (pgbouncer on 6432, haproxy with
# /etc/haproxy/haproxy.cfg). Stop them; the benchmark runs its own.
for svc in pgbouncer haproxy; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
done
# A MariaDB server installed just now starts the package's own instance (port
# 3306): stop it. One that was already there is left alone.
if [ "$new_mariadb" -eq 1 ]; then
    $SUDO service mariadb stop >/dev/null 2>&1 || true
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now mariadb >/dev/null 2>&1 || true
    fi
fi
# Without an init system `service` may not find them: stop the packages'
# daemons by their own pidfiles (never by process name, so a benchmark run in
# progress elsewhere is left alone).
for pidfile in /var/run/postgresql/pgbouncer.pid /run/postgresql/pgbouncer.pid \
               /run/haproxy.pid /var/run/haproxy.pid; do
    if [ -r "$pidfile" ]; then
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            $SUDO kill "$pid" 2>/dev/null || true
        fi
    fi
done

here="$(cd "$(dirname "$0")" && pwd)"
built="$here/.pgbouncer/bin/pgbouncer"
if $build_pgbouncer && [ ! -x "$built" ]; then
    echo "setup.sh: building PgBouncer from Debian 13's source package into $here/.pgbouncer"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y --no-install-recommends dpkg-dev build-essential pkg-config libevent-dev libssl-dev
    src_list=/etc/apt/sources.list.d/endpoint-proxy-trixie-src.list
    echo "deb-src http://deb.debian.org/debian trixie main" | $SUDO tee "$src_list" >/dev/null
    work="$(mktemp -d)"
    trap 'rm -rf "$work"; $SUDO rm -f "$src_list"' EXIT
    $SUDO apt-get update -qq
    (cd "$work" && apt-get source --download-only pgbouncer >/dev/null)
    tar -xzf "$work"/pgbouncer_*.orig.tar.gz -C "$work"
    (cd "$work"/pgbouncer-*/ && ./configure --prefix="$here/.pgbouncer" --without-cares >/dev/null \
        && make -j"$(nproc)" >/dev/null && make install >/dev/null)
    # PgBouncer runs as postgres when the benchmarks run as root: it must reach the binary.
    chmod -R a+rX "$here/.pgbouncer"
fi
echo "setup.sh: pgbouncer $(pgbouncer --version 2>/dev/null | head -n1 || echo '?')"
if [ -x "$built" ]; then
    echo "setup.sh: benchmarks/.pgbouncer: $("$built" --version 2>/dev/null | head -n1 || echo '?') (used by the scripts)"
fi
echo "setup.sh: $(haproxy -v 2>/dev/null | head -n1 || echo 'haproxy ?')"
echo "setup.sh: $(sysbench --version 2>/dev/null | head -n1 || echo 'sysbench ?')"
