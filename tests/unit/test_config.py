"""Config validation: good files load, bad ones name the offending key path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from endpoint_proxy.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "clusters": [{
        "name": "app",
        "protocol": "postgresql",
        "users": [{"name": "app", "password": "s"}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 5432},
                      {"name": "b", "host": "127.0.0.1", "port": 5433}],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:6432", "kind": "writer"},
                      {"name": "r", "listen": "127.0.0.1:6433", "kind": "reader"}],
    }],
}


def with_change(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def test_defaults() -> None:
    cfg = parse_config(copy.deepcopy(BASE))
    c = cfg.clusters[0]
    assert c.health_check_interval_ms == 250
    assert c.max_replica_lag_ms == 1000
    assert c.failover_timeout_ms == 30000
    assert c.reader_fallback_to_writer is True
    assert c.endpoints[0].tls == "optional"
    assert cfg.server.workers == 1
    assert cfg.logging.format == "console"


@pytest.mark.parametrize(("path", "value", "key_path"), [
    (["clusters", 0, "endpoints", 1, "kind"], "bogus", "clusters[0].endpoints[1].kind"),
    (["clusters", 0, "protocol"], "oracle", "clusters[0].protocol"),
    (["clusters", 0, "name"], KeyError, "clusters[0].name"),
    (["clusters", 0, "instances", 1, "port"], "5433", "clusters[0].instances[1].port"),
    (["clusters", 0, "instances", 1, "port"], 70000, "clusters[0].instances[1].port"),
    (["clusters", 0, "instances", 1, "name"], "a", "clusters[0].instances[1].name"),
    (["clusters", 0, "endpoints", 0, "listen"], "nonsense", "clusters[0].endpoints[0].listen"),
    (["clusters", 0, "endpoints", 1, "listen"], "127.0.0.1:6432", "clusters[0].endpoints[1].listen"),
    (["clusters", 0, "endpoints", 0, "tls"], "maybe", "clusters[0].endpoints[0].tls"),
    (["clusters", 0, "endpoints", 0, "tls"], "required", "clusters[0].endpoints[0].tls"),
    (["clusters", 0, "health_check_interval_ms"], True, "clusters[0].health_check_interval_ms"),
    (["clusters", 0, "reader_fallback_to_writer"], "yes", "clusters[0].reader_fallback_to_writer"),
    (["clusters", 0, "backend_tls"], "always", "clusters[0].backend_tls"),
    (["clusters", 0, "client_auth"], "password", "clusters[0].client_auth"),
    (["clusters", 0, "surprise"], 1, "clusters[0].surprise"),
    (["clusters", 0, "instances"], [], "clusters[0].instances"),
    (["clusters"], [], "clusters"),
    (["logging"], {"format": "xml"}, "logging.format"),
    (["server"], {"workers": 0}, "server.workers"),
    (["admin"], {"listen": "9187"}, "admin.listen"),
])
def test_bad_values_name_their_key(path: list[Any], value: Any, key_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(path, value))
    assert info.value.path == key_path


def test_custom_endpoint_rules() -> None:
    custom = {"name": "c", "listen": "127.0.0.1:6434", "kind": "custom", "role": "any", "members": ["b"]}
    cfg = parse_config(with_change(["clusters", 0, "endpoints", 1], custom))
    assert cfg.clusters[0].endpoints[1].members == ("b",)
    both = dict(custom, excluded=["a"])
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(["clusters", 0, "endpoints", 1], both))
    assert info.value.path == "clusters[0].endpoints[1].members"
    unknown = dict(custom, members=["zz"])
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(["clusters", 0, "endpoints", 1], unknown))
    assert info.value.path == "clusters[0].endpoints[1].members[0]"
    inst = {"name": "i", "listen": "127.0.0.1:6434", "kind": "instance", "instance": "nope"}
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(["clusters", 0, "endpoints", 1], inst))
    assert info.value.path == "clusters[0].endpoints[1].instance"


def test_example_configs_are_valid() -> None:
    for path in sorted((REPO / "config").glob("*.toml")):
        load_config(path)


def test_load_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[clusters]\nname=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def _check(tmp_path: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(doc))
    return subprocess.run([sys.executable, "-m", "endpoint_proxy", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_cli_check(tmp_path: Path) -> None:
    ok = _check(tmp_path, copy.deepcopy(BASE))
    assert ok.returncode == 0, ok.stderr
    bad = _check(tmp_path, with_change(["clusters", 0, "endpoints", 1, "kind"], "bogus"))
    assert bad.returncode != 0
    assert "clusters[0].endpoints[1].kind" in bad.stderr
