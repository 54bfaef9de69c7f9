"""The ``endpoint-proxy`` command: run, check, demo, and switchover (through a running proxy)."""

from __future__ import annotations

import argparse
import base64
import gc
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from . import __version__, compiled
from .config import Config, ConfigError, load_config


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"endpoint-proxy: invalid config: {e}", file=sys.stderr)
        return 2
    n_endpoints = sum(len(c.endpoints) for c in config.clusters)
    print(f"{args.config}: OK ({len(config.clusters)} cluster(s), {n_endpoints} endpoint(s))")
    return 0


async def _serve(config: Config, worker_index: int, workers: int, runtime_dir: str | None,
                 on_ready: Callable[[dict[str, str]], None] | None = None,
                 config_path: str | Path | None = None) -> None:
    """Run one proxy until a signal: SIGHUP reloads the config file; SIGTERM or SIGINT drains
    (running statements and transactions finish, up to shutdown_timeout_ms); a second one
    closes at once."""
    from .app import Proxy

    async with trio.open_nursery() as nursery:
        proxy = Proxy(config, worker_index=worker_index, workers=workers, runtime_dir=runtime_dir,
                      config_path=config_path)
        await nursery.start(proxy.run)
        if on_ready is not None:
            on_ready({k: str(v) for k, v in proxy.bound.items()})
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if config_path is not None:
                        nursery.start_soon(_reload_quietly, proxy)
                    continue
                if proxy.draining:
                    nursery.cancel_scope.cancel()  # the second signal: at once
                    break
                nursery.start_soon(_drain_then_stop, proxy, nursery.cancel_scope)


async def _drain_then_stop(proxy: Any, scope: trio.CancelScope) -> None:
    await proxy.shutdown(proxy.config.server.shutdown_timeout_ms / 1000)
    scope.cancel()


async def _reload_quietly(proxy: Any) -> None:
    try:
        await proxy.reload_from_file()
    except Exception:  # noqa: BLE001 - logged by the proxy as config_reload_failed
        pass  # the old configuration stays, in every worker


def _worker_main(config: Config, index: int, workers: int, runtime_dir: str, config_path: str) -> None:
    from .server.logs import configure_logging

    configure_logging(config.logging, worker=index)
    try:
        trio.run(_serve, config, index, workers, runtime_dir, None, config_path)
    except KeyboardInterrupt:
        pass


def _tune_gc() -> None:
    """The relay allocates a few short-lived objects per message and builds no cycles on its
    hot path: collect the young generation far less often, and never rescan start-up objects."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _run(args: argparse.Namespace) -> int:
    from .server.logs import configure_logging

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"endpoint-proxy: invalid config: {e}", file=sys.stderr)
        return 2
    workers = args.workers or config.server.workers
    _tune_gc()
    build = compiled.summary()
    if build.startswith("stale"):
        print(f"endpoint-proxy: warning: {build}", file=sys.stderr)
    if workers == 1:
        configure_logging(config.logging)
        try:
            trio.run(_serve, config, 0, 1, None, None, str(args.config))
        except KeyboardInterrupt:
            pass
        except OSError as e:
            print(f"endpoint-proxy: {e}", file=sys.stderr)
            return 1
        return 0
    return _run_workers(config, workers, str(args.config))


def _run_workers(config: Config, workers: int, config_path: str) -> int:
    """Fork worker processes that share each endpoint's port through SO_REUSEPORT."""
    for c in config.clusters:
        for ep in c.endpoints:
            if ep.listen.port == 0:
                print(f"endpoint-proxy: endpoint {ep.name}: workers > 1 needs a fixed listen port",
                      file=sys.stderr)
                return 2
    runtime_dir = tempfile.mkdtemp(prefix="endpoint-proxy-")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker_main, args=(config, i, workers, runtime_dir, config_path), daemon=False)
             for i in range(workers)]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    def reload(_signum: int, _frame: object) -> None:
        # Worker 0 runs every reload for all workers (all or nothing); the others would only
        # ask it to.
        if procs[0].pid is not None and procs[0].is_alive():
            os.kill(procs[0].pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    try:
        code = 0
        for p in procs:
            p.join()
            if p.exitcode:
                code = 1
                forward(signal.SIGTERM, None)
        return code
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _switchover(args: argparse.Namespace) -> int:
    """Ask the running proxy (its admin HTTP server, from the config) for a planned switchover;
    exit 0 when it completed, 1 when it was refused, abandoned or failed, 2 on a bad config."""
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"endpoint-proxy: invalid config: {e}", file=sys.stderr)
        return 2
    listen = config.admin.listen
    if listen is None or listen.port == 0:
        print(f"endpoint-proxy: {args.config} has no [admin] listen address with a fixed port: the switchover "
              "command asks the running proxy through its admin HTTP server", file=sys.stderr)
        return 2
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    body = json.dumps({k: v for k, v in (("cluster", args.cluster), ("to", args.to)) if v is not None})
    conn: http.client.HTTPConnection
    if config.admin.tls:
        conn = http.client.HTTPSConnection(host, listen.port, timeout=args.timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(host, listen.port, timeout=args.timeout)
    try:
        conn.request("POST", "/switchover", body, {"Content-Type": "application/json", **_admin_auth(config)})
        response = conn.getresponse()
        answer = response.read()
    except OSError as e:
        print(f"endpoint-proxy: cannot reach the proxy's admin server at {listen}: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    try:
        doc = json.loads(answer)
    except ValueError:
        print(f"endpoint-proxy: unexpected answer ({response.status}): {answer[:200]!r}", file=sys.stderr)
        return 1
    record = doc.get("switchover") if isinstance(doc, dict) else None
    if isinstance(record, dict):
        line = (f"switchover of cluster {record.get('cluster')}: {record.get('from')} -> {record.get('to')}: "
                f"{record.get('outcome')}, writes paused {record.get('pause_ms')} ms")
        detail = record.get("detail")
        print(line + (f" ({detail})" if detail else ""), file=sys.stdout if doc.get("ok") else sys.stderr)
    else:
        print(f"endpoint-proxy: switchover refused: {doc.get('error') if isinstance(doc, dict) else doc}",
              file=sys.stderr)
    return 0 if isinstance(doc, dict) and doc.get("ok") is True else 1


def _admin_auth(config: Config) -> dict[str, str]:
    """The credential the config gives for the admin HTTP server: its token, else the first admin
    user with a plaintext password (basic auth); none when neither is configured."""
    if config.admin.token:
        return {"Authorization": f"Bearer {config.admin.token}"}
    for user in config.admin.users:
        if user.password:
            basic = base64.b64encode(f"{user.name}:{user.password}".encode()).decode()
            return {"Authorization": f"Basic {basic}"}
    return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo(args: argparse.Namespace) -> int:
    if args.patroni:
        return _demo_patroni(args)
    from .config import parse_config
    from .localcluster.postgresql import PostgresCluster
    from .server.logs import configure_logging

    print("endpoint-proxy demo: starting a PostgreSQL primary and 2 streaming replicas ...", flush=True)
    with PostgresCluster(replicas=2) as cluster:
        writer_port = args.port or _free_port()
        reader_port = _free_port() if not args.port else args.port + 1
        doc = {
            "logging": {"format": "console", "level": "info"},
            "admin": {"listen": f"127.0.0.1:{_free_port()}",
                      "users": [{"name": "admin", "password": "admin-secret"}]},
            "clusters": [{
                "name": "demo",
                "protocol": "postgresql",
                "health_check_interval_ms": 250,
                "monitor": {"user": cluster.monitor_user, "password": cluster.monitor_password},
                # Drills: SWITCHOVER and a simulated writer failure promote a replica with SQL.
                "promotion": {"method": "sql", "user": cluster.promotion_user,
                              "password": cluster.promotion_password},
                "users": [{"name": cluster.app_user, "password": cluster.app_password}],
                "instances": [{"name": i.name, "host": i.host, "port": i.port} for i in cluster.instances],
                "endpoints": [
                    {"name": "writer", "listen": f"127.0.0.1:{writer_port}", "kind": "writer"},
                    {"name": "reader", "listen": f"127.0.0.1:{reader_port}", "kind": "reader"},
                    {"name": "readwrite", "listen": f"127.0.0.1:{_free_port()}", "kind": "readwrite"},
                ],
            }],
        }
        config = parse_config(doc)
        configure_logging(config.logging)

        def ready(bound: dict[str, str]) -> None:
            pw = cluster.app_password
            print(f"\nendpoint-proxy demo is ready. Cluster files: {cluster.root_dir}\nInstances:")
            for i in cluster.instances:
                role = "primary" if i.name == cluster.primary_name else "replica"
                print(f"  {i.name}: 127.0.0.1:{i.port} ({role})")
            print("\nConnect through the proxy (Ctrl-C stops everything):")
            for name in ("writer", "reader", "readwrite"):
                addr = bound[name]
                port = addr.rsplit(":", 1)[1]
                print(f"  {name:9}  PGPASSWORD={pw} psql -h 127.0.0.1 -p {port} -U {cluster.app_user} "
                      f"{cluster.database} -c 'select inet_server_port(), pg_is_in_recovery()'")
            writer_port = bound["writer"].rsplit(":", 1)[1]
            console = f"PGPASSWORD=admin-secret psql -h 127.0.0.1 -p {writer_port} -U admin endpoint_proxy -c"
            print("\nDrills, from the admin console (see README \"Drills\"):")
            print(f"  switchover  {console} 'SWITCHOVER'")
            print(f"  failure     {console} 'SIMULATE INSTANCE FAILURE pg1 FOR 30 SECONDS'")
            print(f"  faults      {console} 'SHOW FAULTS'")
            print(f"\nStatus page and metrics: http://{bound['admin']}/  (/topology, /metrics; user admin, "
                  "password admin-secret)", flush=True)
            if args.exit_after_ready:
                raise KeyboardInterrupt

        try:
            trio.run(_serve, config, 0, 1, None, ready)
        except KeyboardInterrupt:
            pass
        print("endpoint-proxy demo: stopping the cluster ...", flush=True)
    return 0


def _demo_patroni(args: argparse.Namespace) -> int:
    """``demo --patroni``: etcd and three Patroni nodes; the proxy follows Patroni's leader key."""
    from .config import parse_config
    from .localcluster.patroni import PatroniCluster
    from .server.logs import configure_logging

    print("endpoint-proxy demo: starting etcd and 3 Patroni nodes (the first run installs Patroni) ...",
          flush=True)
    with PatroniCluster(3) as cluster:
        writer_port = args.port or _free_port()
        reader_port = _free_port() if not args.port else args.port + 1
        doc = {
            "logging": {"format": "console", "level": "info"},
            "admin": {"listen": f"127.0.0.1:{_free_port()}",
                      "users": [{"name": "admin", "password": "admin-secret"}]},
            "clusters": [{
                "name": "demo",
                "protocol": "postgresql",
                "health_check_interval_ms": 250,
                "monitor": {"user": cluster.monitor_user, "password": cluster.monitor_password},
                "users": [{"name": cluster.app_user, "password": cluster.app_password}],
                # No [[clusters.instances]]: the members and the writer come from Patroni.
                "patroni": {"scope": cluster.scope, "namespace": cluster.namespace, "etcd": [cluster.etcd_url],
                            "rest": cluster.rest_urls},
                "promotion": {"method": "patroni"},
                "endpoints": [
                    {"name": "writer", "listen": f"127.0.0.1:{writer_port}", "kind": "writer"},
                    {"name": "reader", "listen": f"127.0.0.1:{reader_port}", "kind": "reader"},
                    {"name": "readwrite", "listen": f"127.0.0.1:{_free_port()}", "kind": "readwrite"},
                ],
            }],
        }
        config = parse_config(doc)
        configure_logging(config.logging)

        def ready(bound: dict[str, str]) -> None:
            print(f"\nendpoint-proxy demo (Patroni) is ready. Cluster files: {cluster.root_dir}")
            print(f"etcd: {cluster.etcd_url}   leader: {cluster.leader()}")
            for node in cluster.instances:
                print(f"  {node.name}: postgres 127.0.0.1:{node.port}, Patroni REST {node.rest_url}")
            print("\nConnect through the proxy (Ctrl-C stops everything):")
            for name in ("writer", "reader", "readwrite"):
                port = bound[name].rsplit(":", 1)[1]
                print(f"  {name:9}  PGPASSWORD={cluster.app_password} psql -h 127.0.0.1 -p {port} "
                      f"-U {cluster.app_user} {cluster.database} -c 'select inet_server_port(), pg_is_in_recovery()'")
            port = bound["writer"].rsplit(":", 1)[1]
            console = f"PGPASSWORD=admin-secret psql -h 127.0.0.1 -p {port} -U admin endpoint_proxy -c"
            print("\nSwitch over through Patroni, or watch the leader key:")
            print(f"  switchover  {console} 'SWITCHOVER'")
            print(f"  clusters    {console} 'SHOW CLUSTERS'")
            print(f"\nStatus page: http://{bound['admin']}/  (/topology has `authority`; user admin, "
                  "password admin-secret)", flush=True)
            if args.exit_after_ready:
                raise KeyboardInterrupt

        try:
            trio.run(_serve, config, 0, 1, None, ready)
        except KeyboardInterrupt:
            pass
        print("endpoint-proxy demo: stopping Patroni and etcd ...", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endpoint-proxy",
                                     description="Aurora-style endpoints for PostgreSQL and MySQL clusters")
    parser.add_argument("--version", action="version", version=f"endpoint-proxy {__version__} ({compiled.summary()})")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, type=Path)
    run.add_argument("--workers", type=int, default=None, help="override [server] workers")
    run.set_defaults(func=_run)
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", required=True, type=Path)
    check.set_defaults(func=_check)
    switch = sub.add_parser("switchover", help="planned switchover through the running proxy (admin HTTP)")
    switch.add_argument("--config", required=True, type=Path, help="the running proxy's config (for admin.listen)")
    switch.add_argument("--to", default=None, help="the replica to promote (default: the least lagging)")
    switch.add_argument("--cluster", default=None, help="the cluster (default: the only one)")
    switch.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    switch.set_defaults(func=_switchover)
    demo = sub.add_parser("demo", help="start a local primary + 2 replicas with the proxy in front")
    demo.add_argument("--port", type=int, default=None, help="writer port (reader gets the next one)")
    demo.add_argument("--patroni", action="store_true",
                      help="etcd + 3 Patroni nodes instead; the proxy follows Patroni's leader key")
    demo.add_argument("--exit-after-ready", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
