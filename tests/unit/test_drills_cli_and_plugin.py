"""The pieces of the switchover CLI and the pytest plugin that need no server."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from endpoint_proxy import cli
from endpoint_proxy.config import parse_config
from endpoint_proxy.testing.harness import endpoint_table, toml_dumps
from tests.fixtures.proxy import free_port

BASE = """
[[clusters]]
name = "app"
protocol = "postgresql"
[[clusters.users]]
name = "app"
password = "s"
[[clusters.instances]]
name = "a"
host = "127.0.0.1"
port = 5432
"""


def test_switchover_cli_needs_the_admin_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(BASE)
    assert cli.main(["switchover", "--config", str(path)]) == 2
    assert "has no [admin] listen address" in capsys.readouterr().err
    path.write_text('[admin]\nlisten = "127.0.0.1:0"\n' + BASE)
    assert cli.main(["switchover", "--config", str(path)]) == 2
    path.write_text("[clusters\n")
    assert cli.main(["switchover", "--config", str(path)]) == 2
    assert "invalid config" in capsys.readouterr().err


def test_switchover_cli_says_when_no_proxy_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n' + BASE)
    assert cli.main(["switchover", "--config", str(path), "--to", "b"]) == 1
    assert "cannot reach the proxy's admin server" in capsys.readouterr().err


def test_toml_dumps_writes_what_the_config_reads() -> None:
    doc: dict[str, Any] = {
        "logging": {"format": "json", "level": "info"},
        "admin": {"listen": "127.0.0.1:9000", "users": [{"name": "admin", "password": 'pa"ss\\word'}]},
        "clusters": [{
            "name": "ep", "protocol": "postgresql", "health_check_interval_ms": 100,
            "reader_fallback_to_writer": False, "read_functions": ["f", "g"],
            "monitor": {"user": "m", "password": "m"},
            "promotion": {"method": "command", "command": ["promote", "--now"]},
            "users": [{"name": "app", "password": "x"}],
            "instances": [{"name": "pg0", "host": "127.0.0.1", "port": 5432}],
            "endpoints": [endpoint_table("writer", 6000), endpoint_table({"name": "one", "kind": "instance",
                                                                           "instance": "pg0"}, 6001)],
        }],
    }
    text = toml_dumps(doc)
    assert tomllib.loads(text) == doc
    config = parse_config(tomllib.loads(text))
    assert config.clusters[0].promotion.command == ("promote", "--now")
    assert [e.listen.port for e in config.clusters[0].endpoints] == [6000, 6001]


def test_endpoint_names_need_a_kind_unless_they_are_one() -> None:
    assert endpoint_table("reader", 1) == {"name": "reader", "listen": "127.0.0.1:1", "kind": "reader"}
    with pytest.raises(ValueError, match="give a table with its kind"):
        endpoint_table("analytics", 1)
    with pytest.raises(ValueError, match="name and kind are required"):
        endpoint_table({"name": "x"}, 1)
