"""Config: secrets without plaintext (verifiers, files, environment), admin access, backend trust."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from endpoint_proxy.config import (
    STORED_MD5,
    STORED_MYSQL_NATIVE,
    STORED_SCRAM,
    ConfigError,
    parse_config,
    parse_stored_password,
)
from endpoint_proxy.protocol.pg.auth import format_scram_verifier, make_scram_secret

REPO = Path(__file__).resolve().parents[2]
SECRET = "Pa55-w0rd-not-for-logs"
VERIFIER = format_scram_verifier(make_scram_secret(SECRET))
MD5 = "md5" + hashlib.md5((SECRET + "app").encode()).hexdigest()
NATIVE = "*" + hashlib.sha1(hashlib.sha1(SECRET.encode()).digest()).hexdigest().upper()


def doc(protocol: str = "postgresql", **cluster: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "app", "protocol": protocol,
        "users": [{"name": "app", "password": SECRET}],
        "instances": [{"name": "a", "host": "127.0.0.1", "port": 5432}],
        "endpoints": [{"name": "w", "listen": "127.0.0.1:6432", "kind": "writer"}],
    }
    c.update(cluster)
    return {"clusters": [c]}


def error_of(d: dict[str, Any], environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(d, environ or {})
    return info.value


# --- stored forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "protocol", "kind"), [
    (VERIFIER, "postgresql", STORED_SCRAM),
    (MD5, "postgresql", STORED_MD5),
    (NATIVE, "mysql", STORED_MYSQL_NATIVE),
    (NATIVE.lower(), "mysql", STORED_MYSQL_NATIVE),
    (SECRET, "postgresql", None),
    ("md5-is-a-fine-password", "postgresql", None),
    ("md5" + "A" * 32, "postgresql", None),  # PostgreSQL's hashes are lower-case hex
    (NATIVE, "postgresql", None),  # a MySQL hash means nothing to PostgreSQL
    (VERIFIER, "mysql", None),
])
def test_stored_forms_are_detected(text: str, protocol: str, kind: str | None) -> None:
    stored = parse_stored_password(text, protocol)
    assert (stored.kind if stored else None) == kind


def test_a_broken_verifier_is_an_error_not_a_password() -> None:
    bad = VERIFIER[:-6] + "!!!!!!"
    err = error_of(doc(users=[{"name": "app", "password": bad}]))
    assert err.path == "clusters[0].users[0].password"
    assert bad not in str(err)


def test_user_with_a_verifier_has_no_password_and_no_secret_in_repr() -> None:
    cfg = parse_config(doc(users=[{"name": "app", "password": VERIFIER},
                                  {"name": "old", "password": MD5, "auth": "md5"},
                                  {"name": "plain", "password": SECRET}]), {})
    app, old, plain = cfg.clusters[0].users
    assert app.password is None and app.stored is not None and app.stored.kind == STORED_SCRAM
    assert old.password is None and old.stored is not None and old.stored.kind == STORED_MD5
    assert plain.password == SECRET and plain.stored is None
    text = repr(cfg) + str(app.stored)
    for secret in (SECRET, VERIFIER, MD5, VERIFIER.split("$")[2]):
        assert secret not in text


@pytest.mark.parametrize(("protocol", "user", "ok"), [
    ("postgresql", {"password": VERIFIER}, True),
    ("postgresql", {"password": VERIFIER, "auth": "md5"}, False),
    ("postgresql", {"password": MD5}, False),  # SCRAM (the default) cannot check against md5
    ("postgresql", {"password": MD5, "auth": "md5"}, True),
    ("mysql", {"password": NATIVE}, True),
    ("mysql", {"password": NATIVE, "auth": "caching_sha2_password"}, False),
])
def test_a_verifier_must_fit_the_client_method(protocol: str, user: dict[str, str], ok: bool) -> None:
    d = doc(protocol, users=[{"name": "app", **user}])
    if ok:
        parse_config(d, {})
    else:
        err = error_of(d)
        assert err.path == "clusters[0].users[0].password"
        assert SECRET not in str(err) and user["password"] not in str(err)


def test_cleartext_client_auth_checks_against_an_md5_hash(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    d = doc(users=[{"name": "app", "password": MD5, "auth": "password"}])
    d["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    parse_config(d, {})
    d["clusters"][0]["users"] = [{"name": "app", "password": VERIFIER, "auth": "password"}]
    assert error_of(d).path == "clusters[0].users[0].password"


# --- password_file, password_env -------------------------------------------------------------------


def test_password_file_strips_one_newline(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    for content, expected in [(SECRET + "\n", SECRET), (SECRET + "\r\n", SECRET), (SECRET, SECRET),
                              (SECRET + "\n\n", SECRET + "\n"), (VERIFIER + "\n", None)]:
        f.write_text(content)
        cfg = parse_config(doc(users=[{"name": "app", "password_file": str(f)}]), {})
        assert cfg.clusters[0].users[0].password == expected


def test_password_env() -> None:
    cfg = parse_config(doc(users=[{"name": "app", "password_env": "APP_PW"}]), {"APP_PW": VERIFIER})
    user = cfg.clusters[0].users[0]
    assert user.password is None and user.stored is not None and user.stored.text == VERIFIER
    err = error_of(doc(users=[{"name": "app", "password_env": "APP_PW"}]), {})
    assert err.path == "clusters[0].users[0].password_env"
    assert "APP_PW is not set" in err.detail


def test_password_sources_are_exclusive_and_one_is_required(tmp_path: Path) -> None:
    err = error_of(doc(users=[{"name": "app", "password": "x", "password_env": "X"}]), {"X": "y"})
    assert err.path == "clusters[0].users[0].password_env"
    assert error_of(doc(users=[{"name": "app"}])).path == "clusters[0].users[0].password"
    err = error_of(doc(users=[{"name": "app", "password_file": str(tmp_path / "missing")}]))
    assert err.path == "clusters[0].users[0].password_file" and "not found" in err.detail


def test_monitor_password_from_file_or_env_but_never_a_verifier(tmp_path: Path) -> None:
    f = tmp_path / "monitor"
    f.write_text("monitor-pw\n")
    cfg = parse_config(doc(monitor={"user": "m", "password_file": str(f)}), {})
    assert cfg.clusters[0].monitor is not None and cfg.clusters[0].monitor.password == "monitor-pw"
    assert "monitor-pw" not in repr(cfg.clusters[0].monitor)
    cfg = parse_config(doc(monitor={"user": "m", "password_env": "M"}), {"M": "from-env"})
    assert cfg.clusters[0].monitor is not None and cfg.clusters[0].monitor.password == "from-env"
    assert error_of(doc(monitor={"user": "m", "password": VERIFIER})).path == "clusters[0].monitor.password"


# --- admin -----------------------------------------------------------------------------------------


def with_admin(admin: dict[str, Any]) -> dict[str, Any]:
    d = doc()
    d["admin"] = admin
    return d


@pytest.mark.parametrize("listen", ["127.0.0.1:9187", "127.1.2.3:9187", "[::1]:9187", "localhost:9187"])
def test_admin_on_loopback_needs_no_credential(listen: str) -> None:
    cfg = parse_config(with_admin({"listen": listen}), {})
    assert cfg.admin.listen is not None and not cfg.admin.requires_credentials


@pytest.mark.parametrize("listen", ["0.0.0.0:9187", "[::]:9187", "10.1.2.3:9187", "admin.example:9187"])
def test_admin_beyond_loopback_needs_a_credential(listen: str) -> None:
    err = error_of(with_admin({"listen": listen}))
    assert err.path == "admin.listen" and "admin.token" in err.detail
    parse_config(with_admin({"listen": listen, "token": "a-token"}), {})
    parse_config(with_admin({"listen": listen, "users": [{"name": "ops", "password": "pw"}]}), {})


def test_admin_token_sources(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("token-from-file\n")
    assert parse_config(with_admin({"token_file": str(f)}), {}).admin.token == "token-from-file"
    assert parse_config(with_admin({"token_env": "T"}), {"T": "token-from-env"}).admin.token == "token-from-env"
    assert error_of(with_admin({"token_env": "T"})).path == "admin.token_env"
    assert error_of(with_admin({"token": ""})).path == "admin.token"
    assert error_of(with_admin({"token": "a", "token_file": str(f)})).path == "admin.token_file"
    cfg = parse_config(with_admin({"token": "token-in-file", "metrics_public": True}), {})
    assert cfg.admin.metrics_public and "token-in-file" not in repr(cfg)


def test_admin_users_take_scram_verifiers_only() -> None:
    cfg = parse_config(with_admin({"users": [{"name": "ops", "password": VERIFIER}]}), {})
    assert cfg.admin.users[0].password is None and cfg.admin.users[0].stored is not None
    assert error_of(with_admin({"users": [{"name": "ops", "password": MD5}]})).path == "admin.users[0].password"
    assert error_of(with_admin({"users": [{"name": "ops", "password": ""}]})).path == "admin.users[0].password"


def test_admin_tls_needs_the_tls_files() -> None:
    assert error_of(with_admin({"tls": True})).path == "admin.tls"


# --- backends --------------------------------------------------------------------------------------


def test_backend_defaults() -> None:
    pg = parse_config(doc(), {}).clusters[0]
    assert pg.backend_tls == "off" and pg.backend_auth == ("scram-sha-256",) and pg.backend_ca_file is None
    my = parse_config(doc("mysql"), {}).clusters[0]
    assert my.backend_auth == ("mysql_native_password", "caching_sha2_password")
    assert my.allow_public_key_retrieval is False and my.server_public_key_file is None


def test_backend_keys(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = parse_config(doc(backend_tls="verify-full", backend_ca_file=str(ca),
                         backend_auth=["scram-sha-256", "md5"]), {}).clusters[0]
    assert (c.backend_tls, c.backend_ca_file, c.backend_auth) == ("verify-full", str(ca), ("scram-sha-256", "md5"))
    assert parse_config(doc(backend_tls="verify-ca"), {}).clusters[0].backend_ca_file is None  # system CAs
    m = parse_config(doc("mysql", server_public_key_file=str(ca), allow_public_key_retrieval=True), {}).clusters[0]
    assert m.server_public_key_file == str(ca) and m.allow_public_key_retrieval


@pytest.mark.parametrize(("protocol", "changes", "key"), [
    ("postgresql", {"backend_tls": "verify"}, "clusters[0].backend_tls"),
    ("postgresql", {"backend_tls": "require", "backend_ca_file": "/etc/hostname"}, "clusters[0].backend_ca_file"),
    ("postgresql", {"backend_tls": "verify-ca", "backend_ca_file": "/nonexistent/ca.pem"},
     "clusters[0].backend_ca_file"),
    ("postgresql", {"backend_auth": []}, "clusters[0].backend_auth"),
    ("postgresql", {"backend_auth": ["scram-sha-256", "mysql_native_password"]}, "clusters[0].backend_auth[1]"),
    ("mysql", {"backend_auth": ["md5"]}, "clusters[0].backend_auth[0]"),
    ("postgresql", {"allow_public_key_retrieval": True}, "clusters[0].allow_public_key_retrieval"),
    ("postgresql", {"server_public_key_file": "/etc/hostname"}, "clusters[0].server_public_key_file"),
    ("mysql", {"server_public_key_file": "/nonexistent.pem"}, "clusters[0].server_public_key_file"),
    ("postgresql", {"auth_query": "select usename, passwd from pg_shadow where usename = 'x'"},
     "clusters[0].auth_query"),
    ("mysql", {"auth_query": "select user, authentication_string from mysql.user where user = $1"},
     "clusters[0].auth_query"),
    ("postgresql", {"auth_query": "select * from f($1)", "client_auth": "password"}, "clusters[0].auth_query"),
    ("postgresql", {"auth_cache_ms": -1}, "clusters[0].auth_cache_ms"),
])
def test_bad_security_values_name_their_key(protocol: str, changes: dict[str, Any], key: str) -> None:
    d = doc(protocol, **changes)
    if changes.get("client_auth") == "password":
        d["tls"] = {"cert_file": "/etc/hostname", "key_file": "/etc/hostname"}
    assert error_of(d).path == key


def test_auth_query_keys() -> None:
    c = parse_config(doc(auth_query="select usename, passwd from ep.lookup($1)", auth_cache_ms=5000), {}).clusters[0]
    assert (c.auth_query, c.auth_cache_ms, c.auth_database) == (
        "select usename, passwd from ep.lookup($1)", 5000, "postgres")


def test_check_reports_a_missing_environment_variable_without_the_other_secrets(tmp_path: Path) -> None:
    d = copy.deepcopy(doc(users=[{"name": "app", "password": SECRET}, {"name": "b", "password_env": "NOPE_X"}]))
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(d))
    out = subprocess.run([sys.executable, "-m", "endpoint_proxy", "check", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "clusters[0].users[1].password_env: environment variable NOPE_X is not set" in out.stderr
    assert SECRET not in out.stderr + out.stdout
