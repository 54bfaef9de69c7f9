"""deploy/: the config validates, the compose file and the Kubernetes sidecar agree with it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def config() -> dict[str, Any]:
    with open(DEPLOY / "config.toml", "rb") as f:
        return tomllib.load(f)


def admin_port() -> int:
    return int(config()["admin"]["listen"].rsplit(":", 1)[1])


SECRET_ENV = ("ENDPOINT_PROXY_ADMIN_TOKEN", "APP_PASSWORD", "MONITOR_PASSWORD")


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "endpoint_proxy", "check", "--config", str(DEPLOY / "config.toml")],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def test_config_passes_endpoint_proxy_check() -> None:
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    out = check({**base, **{k: "example" for k in SECRET_ENV}})
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_config_holds_no_secret_and_protects_the_admin_server() -> None:
    cfg = config()
    # The admin server listens beyond loopback, so it must take a token; the secrets come
    # from the environment, and a missing one is an error naming its key.
    assert not cfg["admin"]["listen"].startswith("127.")
    assert cfg["admin"]["token_env"] == "ENDPOINT_PROXY_ADMIN_TOKEN"
    cluster = cfg["clusters"][0]
    assert "password" not in cluster["monitor"] and all("password" not in u for u in cluster["users"])
    assert set(SECRET_ENV) == {cfg["admin"]["token_env"], cluster["monitor"]["password_env"],
                               *(u["password_env"] for u in cluster["users"])}
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    out = check({**base, "APP_PASSWORD": "x", "MONITOR_PASSWORD": "x"})
    assert out.returncode == 2 and "admin.token_env: environment variable ENDPOINT_PROXY_ADMIN_TOKEN is not set" \
        in out.stderr


def test_compose_and_k8s_provide_the_secret_variables() -> None:
    proxy = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["proxy"]
    assert set(SECRET_ENV) <= set(proxy["environment"])
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s-sidecar.yaml").read_text()) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "endpoint-proxy")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(SECRET_ENV) <= set(env)
    for ref in env.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    text = (DEPLOY / "Dockerfile").read_text()
    assert all(f"{name}=" in text for name in SECRET_ENV)  # the build-time check gets placeholders


def test_compose_runs_a_primary_two_replicas_and_the_proxy() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    cfg = config()
    instances = cfg["clusters"][0]["instances"]
    # Every instance of the config is a compose service on PostgreSQL's port.
    assert {i["host"] for i in instances} == {"pg-primary", "pg-replica1", "pg-replica2"}
    assert all(i["port"] == 5432 for i in instances)
    for name in ("pg-primary", "pg-replica1", "pg-replica2"):
        assert services[name]["image"] == "postgres:15"
    for name in ("pg-replica1", "pg-replica2"):
        script = "\n".join(services[name]["command"])
        assert "pg_basebackup" in script and "--host=pg-primary" in script and "--write-recovery-conf" in script
        assert services[name]["depends_on"]["pg-primary"]["condition"] == "service_healthy"
    proxy = services["proxy"]
    assert proxy["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "./config.toml:/etc/endpoint-proxy/config.toml:ro" in proxy["volumes"]
    published = {int(p.rsplit(":", 1)[1]) for p in proxy["ports"]}
    listen_ports = {int(ep["listen"].rsplit(":", 1)[1]) for ep in cfg["clusters"][0]["endpoints"]}
    assert published == listen_ports | {admin_port()}
    init = services["pg-primary"]["volumes"][0].split(":")[0]
    assert (DEPLOY / init).resolve().is_file()


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container["ports"]:
        if p["name"] == port:
            return int(p["containerPort"])
    raise KeyError(port)


def test_k8s_sidecar_probes_and_config() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s-sidecar.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    configmap = by_kind["ConfigMap"]
    assert configmap["data"]["config.toml"] == (DEPLOY / "config.toml").read_text()
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert "app" in containers
    proxy = containers["endpoint-proxy"]
    ready = proxy["readinessProbe"]["httpGet"]
    live = proxy["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert container_port(proxy, ready["port"]) == admin_port()
    assert container_port(proxy, live["port"]) == admin_port()
    mount = next(m for m in proxy["volumeMounts"] if m["mountPath"] == "/etc/endpoint-proxy")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert proxy["securityContext"]["runAsNonRoot"] is True
    # The app reaches the proxy inside the pod, on one of the config's endpoint ports.
    env = {e["name"]: e.get("value") for e in containers["app"]["env"]}
    ports = {int(ep["listen"].rsplit(":", 1)[1]) for ep in config()["clusters"][0]["endpoints"]}
    assert env["PGHOST"] == "127.0.0.1" and int(env["PGPORT"]) in ports


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # A build stage with a compiler makes the wheel (the compiled session core); the image
    # installs it and fails to build if the wheel came out pure Python.
    stages = [line for line in lines if line.startswith("FROM ")]
    assert stages == ["FROM python:3.11-slim AS build", "FROM python:3.11-slim"]
    build = text.split("FROM python:3.11-slim\n")[0]
    assert "gcc" in build and "COPY pyproject.toml setup.py" in build and "pip wheel" in build
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!setup.py" in ignore and "!endpoint_proxy/" in ignore
    assert any(line.startswith("RUN pip install /wheels/") for line in lines)
    assert 'endpoint-proxy --version | grep -q "(compiled"' in text
    user = next(line for line in lines if line.startswith("USER "))
    assert "root" not in user and user.split()[1].split(":")[0] not in ("0", "")
    assert f"http://127.0.0.1:{admin_port()}/healthz" in text and "urllib.request" in text
    assert 'ENTRYPOINT ["endpoint-proxy", "run", "--config", "/etc/endpoint-proxy/config.toml"]' in lines
    assert (DEPLOY / "endpoint-proxy.service").is_file()


def test_two_proxies_behind_haproxy_example() -> None:
    """deploy/patroni: both proxy configs pass `check`, name each other as peers with their own
    ids, and the HAProxy example checks each proxy's /readyz on its admin port."""
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    docs = []
    for n in (1, 2):
        path = DEPLOY / "patroni" / f"proxy-{n}.toml"
        out = subprocess.run([sys.executable, "-m", "endpoint_proxy", "check", "--config", str(path)],
                             capture_output=True, text=True, timeout=60, cwd=REPO,
                             env={**base, **{k: "example" for k in SECRET_ENV}})
        assert out.returncode == 0, out.stderr
        with open(path, "rb") as f:
            docs.append(tomllib.load(f))
    assert [d["server"]["peer_id"] for d in docs] == [1, 2]
    assert docs[0]["peers"] == docs[1]["peers"]
    peers = {p["id"]: p["address"] for p in docs[0]["peers"]}
    haproxy = (DEPLOY / "patroni" / "haproxy.cfg").read_text()
    admin = docs[0]["admin"]["listen"].rsplit(":", 1)[1]
    assert "option httpchk GET /readyz" in haproxy
    for address in peers.values():
        assert f"{address} check port {admin}" in haproxy
