"""Config of planned switchovers: [clusters.promotion] and switchover_timeout_ms."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from endpoint_proxy.config import ClusterConfig, ConfigError, PromotionConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "clusters": [{
        "name": "app",
        "protocol": "postgresql",
        "users": [{"name": "app", "password": "s"}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 5432}],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:6432", "kind": "writer"}],
    }],
}


def cluster(**keys: Any) -> ClusterConfig:
    doc = copy.deepcopy(BASE)
    doc["clusters"][0].update(keys)
    return parse_config(doc).clusters[0]


def test_defaults_refuse_switchovers_and_hold_ten_seconds_at_most() -> None:
    c = cluster()
    assert c.promotion == PromotionConfig(method="none")
    assert c.switchover_timeout_ms == 10_000
    assert c.promotion.timeout_ms == 30_000


def test_sql_promotion() -> None:
    c = cluster(switchover_timeout_ms=1500,
                promotion={"method": "sql", "user": "promoter", "password": "pw", "replication_user": "rep",
                           "replication_password": "rpw", "timeout_ms": 5000})
    assert c.switchover_timeout_ms == 1500
    assert c.promotion == PromotionConfig("sql", "promoter", "pw", None, "rep", "rpw", 5000)


def test_passwords_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    c = cluster(promotion={"method": "sql", "user": "p", "password_file": str(secret)})
    assert c.promotion.password == "from-file"
    monkeypatch.setenv("EP_TEST_PROMOTION_PW", "from-env")
    c = cluster(promotion={"method": "sql", "user": "p", "password_env": "EP_TEST_PROMOTION_PW",
                           "replication_password_env": "EP_TEST_PROMOTION_PW"})
    assert (c.promotion.password, c.promotion.replication_password) == ("from-env", "from-env")


def test_command_promotion_string_or_argv() -> None:
    c = cluster(promotion={"method": "command", "command": "patronictl switchover --force"})
    assert c.promotion.command == ("/bin/sh", "-c", "patronictl switchover --force")
    c = cluster(promotion={"method": "command", "command": ["/usr/local/bin/promote", "--fast"]})
    assert c.promotion.command == ("/usr/local/bin/promote", "--fast")


@pytest.mark.parametrize(("keys", "path", "message"), [
    ({"promotion": {"method": "magic"}}, "clusters[0].promotion.method", "must be one of none, sql, command"),
    ({"promotion": {"method": "sql"}}, "clusters[0].promotion.user", 'method = "sql" needs the user'),
    ({"promotion": {"method": "command"}}, "clusters[0].promotion.command", "needs the command"),
    ({"promotion": {"method": "command", "command": ""}}, "clusters[0].promotion.command", "must not be empty"),
    ({"promotion": {"method": "command", "command": []}}, "clusters[0].promotion.command", "must not be empty"),
    ({"promotion": {"method": "command", "command": ["x", 3]}}, "clusters[0].promotion.command[1]",
     "non-empty string"),
    ({"promotion": {"method": "sql", "user": "p", "command": "x"}}, "clusters[0].promotion.command",
     'only used with method = "command"'),
    ({"promotion": {"method": "sql", "user": "p", "password": "a", "password_env": "B"}},
     "clusters[0].promotion.password_env", "give only one of password, password_env"),
    ({"promotion": {"method": "sql", "user": "p", "password_env": "EP_TEST_SURELY_UNSET"}},
     "clusters[0].promotion.password_env", "environment variable EP_TEST_SURELY_UNSET is not set"),
    ({"promotion": {"method": "sql", "user": "p", "password_file": "/nonexistent/pw"}},
     "clusters[0].promotion.password_file", "file not found: /nonexistent/pw"),
    ({"promotion": {"method": "sql", "user": "p", "timeout_ms": 0}}, "clusters[0].promotion.timeout_ms",
     "at least 1"),
    ({"promotion": {"method": "sql", "user": "p", "colour": "red"}}, "clusters[0].promotion.colour", "unknown key"),
    ({"promotion": "sql"}, "clusters[0].promotion", "must be a table"),
    ({"switchover_timeout_ms": -1}, "clusters[0].switchover_timeout_ms", "at least 0"),
    ({"switchover_timeout_ms": "10s"}, "clusters[0].switchover_timeout_ms", "must be an integer"),
])
def test_bad_promotion_config_names_the_key(keys: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cluster(**keys)
    assert info.value.path == path
    assert message in info.value.detail


def test_the_example_configs_show_promotion_and_load() -> None:
    pg = load_config(REPO / "config" / "example-postgresql.toml").clusters[0]
    assert (pg.promotion.method, pg.promotion.user, pg.switchover_timeout_ms) == ("sql", "promoter", 10_000)
    my = load_config(REPO / "config" / "example-mysql.toml").clusters[0]
    assert (my.promotion.method, my.promotion.replication_user) == ("sql", "replicator")
