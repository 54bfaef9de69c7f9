"""Logins to real servers without plaintext: verified TLS, SCRAM and mysql_native_password
passthrough, auth_query, rotated passwords. What a session will call, without the session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from endpoint_proxy.config import Address, ClusterConfig, parse_config
from endpoint_proxy.localcluster.certs import write_self_signed
from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.mysql import auth as my_auth
from endpoint_proxy.protocol.pg import auth as pg_auth
from endpoint_proxy.protocol.pg import messages as m
from endpoint_proxy.protocol.pg.framing import FrameReader
from endpoint_proxy.server.backend_security import BackendSecurity, backend_tls_context
from endpoint_proxy.server.cluster import AuthQueryError, ClusterRuntime
from endpoint_proxy.server.mysql.backend import MyBackendError, MyProbeConnection
from endpoint_proxy.server.pg.backend import BackendError, ProbeConnection, open_backend

pytestmark = pytest.mark.integration

LOOKUP_FUNCTION = """
create schema if not exists ep;
create or replace function ep.lookup(i_user text, out usename name, out passwd text)
returns setof record language sql security definer set search_path = pg_catalog as $$
    select rolname, rolpassword from pg_authid where rolname = i_user and rolcanlogin
$$;
revoke all on function ep.lookup(text) from public;
grant usage on schema ep to {monitor};
grant execute on function ep.lookup(text) to {monitor};
"""


def pg_config(cluster: PostgresCluster, **extra: Any) -> ClusterConfig:
    doc = {"clusters": [{
        "name": "pg", "protocol": "postgresql", "health_check_interval_ms": 100,
        "monitor": {"user": cluster.monitor_user, "password": cluster.monitor_password},
        "users": extra.pop("users", [{"name": cluster.app_user, "password": cluster.app_password}]),
        "instances": [{"name": i.name, "host": i.host, "port": i.port} for i in cluster.instances],
        **extra,
    }]}
    return parse_config(doc, {}).clusters[0]


def stored_verifier(cluster: PostgresCluster, role: str) -> str:
    return cluster.sql(cluster.primary_name, f"select rolpassword from pg_authid where rolname = '{role}'")


def client_login(auth: pg_auth.ServerAuth, user: str, password: str) -> None:
    """A client (our own SCRAM/md5 client, like libpq) logs in to the proxy's side of ``auth``."""
    client = pg_auth.BackendAuthenticator(user, password, pg_auth.BACKEND_METHODS)
    to_client = auth.start()
    while True:
        reader = FrameReader()
        reader.feed(to_client)
        reply = None
        while (msg := reader.next_message()) is not None:
            decoded = m.decode_backend(*msg)
            reply = client.respond(decoded)  # type: ignore[arg-type]
        if client.done:
            return
        assert reply is not None
        payload_reader = FrameReader()
        payload_reader.feed(reply)
        message = payload_reader.next_message()
        assert message is not None
        to_client, _ = auth.step(message[1])


async def current_user(cluster: PostgresCluster, credential: pg_auth.PgCredential, *, user: str | None = None,
                       security: BackendSecurity | None = None, host: str | None = None) -> str:
    inst = cluster.instance(cluster.primary_name)
    with trio.fail_after(10):
        backend = await open_backend(inst.name, Address(host or inst.host, inst.port),
                                     {"database": cluster.database}, user=user or cluster.app_user,
                                     credential=credential, security=security)
        probe = ProbeConnection(backend)
        try:
            rows = await probe.query("select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()")
        finally:
            await probe.aclose()
    assert rows[0][1] == ("t" if security is not None and security.tls_wanted else "f")
    return str(rows[0][0])


# --- verified TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "host"), [("verify-full", "127.0.0.1"), ("verify-full", "localhost"),
                                            ("verify-ca", "127.0.0.1")])
async def test_verified_tls_to_a_real_server(pg_cluster: PostgresCluster, mode: str, host: str) -> None:
    rt = ClusterRuntime(pg_config(pg_cluster, backend_tls=mode, backend_ca_file=str(pg_cluster.ssl_cert)))
    password = pg_auth.PgCredential(password=pg_cluster.app_password)
    assert await current_user(pg_cluster, password, security=rt.backend_security, host=host) == pg_cluster.app_user


async def test_verified_tls_refuses_a_server_its_ca_did_not_sign(pg_cluster: PostgresCluster,
                                                                 tmp_path: Path) -> None:
    other_ca, _ = write_self_signed(tmp_path)
    for mode in ("verify-ca", "verify-full"):
        rt = ClusterRuntime(pg_config(pg_cluster, backend_tls=mode, backend_ca_file=str(other_ca)))
        with pytest.raises(BackendError, match="TLS handshake failed.*certificate verify failed"):
            await current_user(pg_cluster, pg_auth.PgCredential(password=pg_cluster.app_password),
                               security=rt.backend_security)


async def test_the_monitor_verifies_too(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    other_ca, _ = write_self_signed(tmp_path)
    good = ClusterRuntime(pg_config(pg_cluster, backend_tls="verify-full", backend_ca_file=str(pg_cluster.ssl_cert)))
    bad = ClusterRuntime(pg_config(pg_cluster, backend_tls="verify-full", backend_ca_file=str(other_ca)))
    name = pg_cluster.primary_name
    conn = await good.probe_once(name, None)
    assert conn is not None and good.topology.instances[name].last_error is None
    await conn.aclose()
    assert await bad.probe_once(name, None) is None
    assert "certificate verify failed" in (bad.topology.instances[name].last_error or "")


# --- SCRAM passthrough ----------------------------------------------------------------------------


async def test_scram_passthrough_with_the_servers_own_verifier(pg_cluster: PostgresCluster) -> None:
    verifier = stored_verifier(pg_cluster, pg_cluster.app_user)
    assert verifier.startswith("SCRAM-SHA-256$")
    front = pg_auth.ScramServerAuth(pg_cluster.app_user, pg_auth.parse_scram_verifier(verifier))
    client_login(front, pg_cluster.app_user, pg_cluster.app_password)
    keys = front.passthrough_keys()
    assert keys is not None
    # The proxy logs in with what the client proved; it never had the password.
    assert await current_user(pg_cluster, pg_auth.PgCredential(scram_keys=keys)) == pg_cluster.app_user


async def test_scram_passthrough_with_another_verifier_is_an_account_error(pg_cluster: PostgresCluster) -> None:
    mine = pg_auth.make_scram_secret(pg_cluster.app_password, salt=b"not-the-servers-salt")
    keys = pg_auth.scram_keys_from_password(pg_cluster.app_password, mine.salt, mine.iterations)
    with pytest.raises(BackendError) as info:
        await current_user(pg_cluster, pg_auth.PgCredential(scram_keys=keys))
    assert info.value.raw_error is not None and info.value.sqlstate == "28P01"
    assert "another verifier" in str(info.value)


async def test_a_configured_verifier_checks_the_client_and_logs_in_for_it(pg_cluster: PostgresCluster) -> None:
    # The chain a session runs, without the session: config verifier -> client exchange ->
    # passthrough credential -> server login.
    verifier = stored_verifier(pg_cluster, pg_cluster.app_user)
    rt = ClusterRuntime(pg_config(pg_cluster, users=[{"name": pg_cluster.app_user, "password": verifier}]))
    user = rt.config.user(pg_cluster.app_user)
    assert user is not None and user.password is None
    auth = rt.pg_server_auth(user.name, user, rt.client_method(user))
    client_login(auth, user.name, pg_cluster.app_password)
    credential = rt.pg_backend_credential(user.name, auth)
    assert credential.password is None and credential.scram_keys is not None
    assert await current_user(pg_cluster, credential, security=rt.backend_security) == pg_cluster.app_user
    # A wrong password never gets that far.
    wrong = rt.pg_server_auth(user.name, user, "scram-sha-256")
    with pytest.raises(pg_auth.AuthenticationError):
        client_login(wrong, user.name, "not-the-password")


# --- auth_query -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lookup_function(pg_cluster: PostgresCluster) -> Iterator[None]:
    primary = pg_cluster.primary_name
    pg_cluster.sql(primary, LOOKUP_FUNCTION.format(monitor=pg_cluster.monitor_user), database="postgres")
    pg_cluster.sql(primary, "set password_encryption = 'md5'; "
                            "drop role if exists aq_md5; create role aq_md5 login password 'md5-pass'")
    yield
    pg_cluster.sql(primary, "drop role if exists aq_md5")


@pytest.fixture
async def auth_runtime(pg_cluster: PostgresCluster, lookup_function: None,
                       nursery: trio.Nursery) -> AsyncIterator[ClusterRuntime]:
    rt = ClusterRuntime(pg_config(pg_cluster, users=[], client_auth="md5",
                                  auth_query="select usename, passwd from ep.lookup($1)", auth_cache_ms=60_000))
    await nursery.start(rt.run)
    assert rt.topology.writer == pg_cluster.primary_name
    yield rt
    await rt._close_auth_connection()


async def test_auth_query_finds_a_user_and_logs_in_with_passthrough(pg_cluster: PostgresCluster,
                                                                     auth_runtime: ClusterRuntime) -> None:
    rt = auth_runtime
    stored = await rt.lookup_user(pg_cluster.app_user)
    assert stored is not None and stored.text == stored_verifier(pg_cluster, pg_cluster.app_user)
    user = await rt.find_user(pg_cluster.app_user)
    assert user is not None
    method = rt.client_method(user)
    assert method == "scram-sha-256"  # md5 configured, SCRAM verifier stored: SCRAM, as PostgreSQL does
    auth = rt.pg_server_auth(user.name, user, method)
    client_login(auth, user.name, pg_cluster.app_password)
    credential = rt.pg_backend_credential(user.name, auth)
    assert await current_user(pg_cluster, credential) == pg_cluster.app_user


async def test_auth_query_md5_hash_and_unknown_users(pg_cluster: PostgresCluster,
                                                     auth_runtime: ClusterRuntime) -> None:
    rt = auth_runtime
    md5_user = await rt.find_user("aq_md5")
    assert md5_user is not None and md5_user.stored is not None and md5_user.stored.kind == "md5"
    client_login(rt.pg_server_auth("aq_md5", md5_user, rt.client_method(md5_user)), "aq_md5", "md5-pass")
    assert await rt.find_user("no_such_role_here") is None
    # An unknown name goes through the same exchange and fails with the same error as a
    # wrong password.
    errors = []
    for name, user in (("no_such_role_here", None), ("aq_md5", md5_user)):
        with pytest.raises(pg_auth.AuthenticationError) as info:
            client_login(rt.pg_server_auth(name, user, "md5"), name, "a-wrong-password")
        errors.append((info.value.sqlstate, info.value.message.replace(name, "NAME")))
    assert errors[0] == errors[1]


async def test_auth_query_answers_are_cached_and_shared(pg_cluster: PostgresCluster, auth_runtime: ClusterRuntime,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rt = auth_runtime
    calls: list[str] = []
    original = ProbeConnection.query_params

    async def counting(self: ProbeConnection, sql: str, params: tuple[str | None, ...]) -> Any:
        calls.append(str(params[0]))
        await trio.sleep(0.05)  # let concurrent lookups pile up
        return await original(self, sql, params)

    monkeypatch.setattr(ProbeConnection, "query_params", counting)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(rt.lookup_user, pg_cluster.app_user)
            nursery.start_soon(rt.lookup_user, "nobody_at_all")
    assert sorted(calls) == sorted([pg_cluster.app_user, "nobody_at_all"])
    assert await rt.lookup_user(pg_cluster.app_user) is not None and await rt.lookup_user("nobody_at_all") is None
    assert len(calls) == 2  # both answers, negative included, came from the cache
    # A name that only exists in SQL cannot inject anything: it is a bound parameter.
    assert await rt.lookup_user("x' or '1'='1") is None


async def test_auth_query_failure_is_reported_not_taken_as_an_unknown_user(pg_cluster: PostgresCluster,
                                                                           lookup_function: None) -> None:
    rt = ClusterRuntime(pg_config(pg_cluster, users=[], auth_query="select usename, passwd from ep.nope($1)"))
    with pytest.raises(AuthQueryError, match="no writer"):
        await rt.lookup_user("app")
    conn = await rt.probe_once(pg_cluster.primary_name, None)
    await conn.aclose()
    with pytest.raises(AuthQueryError, match="ep.nope"):
        await rt.lookup_user(pg_cluster.app_user)


# --- rotated passwords ----------------------------------------------------------------------------


async def test_a_rotated_password_applies_to_the_next_server_login(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary_name
    pg_cluster.sql(primary, "drop role if exists rotating; create role rotating login password 'first-pass'")
    pg_cluster.sql(primary, f"grant connect on database {pg_cluster.database} to rotating")
    try:
        def config(password: str) -> ClusterConfig:
            return pg_config(pg_cluster, users=[{"name": "rotating", "password": password}])

        rt = ClusterRuntime(config("first-pass"))
        assert await current_user(pg_cluster, rt.pg_backend_credential("rotating"), user="rotating") == "rotating"
        pg_cluster.sql(primary, "alter role rotating password 'second-pass'")
        new = config("second-pass")
        staged = rt.stage_credentials(new)
        rt.apply_config(new)
        rt.install_credentials(staged)
        assert await current_user(pg_cluster, rt.pg_backend_credential("rotating"), user="rotating") == "rotating"
        with pytest.raises(BackendError) as info:
            await current_user(pg_cluster, pg_auth.PgCredential(password="first-pass"), user="rotating")
        assert info.value.sqlstate == "28P01"
    finally:
        pg_cluster.sql(primary, f"revoke connect on database {pg_cluster.database} from rotating; "
                                "drop role if exists rotating")


# --- MySQL -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def my_tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MariaDBCluster, Path]]:
    cert, key = write_self_signed(tmp_path_factory.mktemp("my-verify"))
    with MariaDBCluster(replicas=0, extra_conf={"ssl_cert": str(cert), "ssl_key": str(key)}) as c:
        yield c, cert


async def my_current_user(cluster: MariaDBCluster, *, credential: my_auth.MyCredential,
                          security: BackendSecurity | None = None, host: str | None = None) -> tuple[str, str]:
    inst = cluster.instances[0]
    with trio.fail_after(10):
        probe = await MyProbeConnection.open(inst.name, Address(host or inst.host, inst.port), user=cluster.app_user,
                                             password=None, credential=credential, security=security)
        try:
            rows = await probe.query("select current_user(), variable_value from information_schema.session_status "
                                     "where variable_name = 'Ssl_version'")
        finally:
            await probe.aclose()
    return str(rows[0][0]), str(rows[0][1] or "")


async def test_mysql_native_passthrough_with_the_servers_own_hash(
        my_tls_cluster: tuple[MariaDBCluster, Path]) -> None:
    cluster, _ = my_tls_cluster
    stored = cluster.sql(cluster.instances[0].name,
                         f"select authentication_string from mysql.user where user = '{cluster.app_user}' limit 1")
    front = my_auth.NativePasswordServerAuth(cluster.app_user, "%", my_auth.parse_native_hash(stored))
    nonce = front.start()[1]
    client = my_auth.BackendAuthenticator(cluster.app_user, cluster.app_password)
    _, response = client.start("mysql_native_password", nonce)
    assert front.step(response, "mysql_native_password") == (None, True)
    stage1 = front.passthrough_stage1()
    assert stage1 is not None
    user, _ = await my_current_user(cluster, credential=my_auth.MyCredential(native_stage1=stage1))
    assert user.startswith(cluster.app_user + "@")


@pytest.mark.parametrize(("mode", "host"), [("verify-full", "127.0.0.1"), ("verify-full", "localhost"),
                                            ("verify-ca", "127.0.0.1")])
async def test_mysql_verified_tls(my_tls_cluster: tuple[MariaDBCluster, Path], mode: str, host: str) -> None:
    cluster, cert = my_tls_cluster
    config = parse_config({"clusters": [{
        "name": "my", "protocol": "mysql", "backend_tls": mode, "backend_ca_file": str(cert),
        "users": [{"name": cluster.app_user, "password": cluster.app_password}],
        "instances": [{"name": i.name, "host": i.host, "port": i.port} for i in cluster.instances],
    }]}, {}).clusters[0]
    rt = ClusterRuntime(config)
    _, tls_version = await my_current_user(cluster, credential=my_auth.MyCredential(password=cluster.app_password),
                                           security=rt.backend_security, host=host)
    assert tls_version.startswith("TLS")


async def test_mysql_verified_tls_refuses_an_unknown_ca(my_tls_cluster: tuple[MariaDBCluster, Path],
                                                        tmp_path: Path) -> None:
    cluster, _ = my_tls_cluster
    other_ca, _ = write_self_signed(tmp_path)
    security = BackendSecurity(tls_mode="verify-full", tls_context=backend_tls_context("verify-full", str(other_ca)))
    with pytest.raises(MyBackendError) as info:
        await my_current_user(cluster, credential=my_auth.MyCredential(password=cluster.app_password),
                              security=security)
    assert "certificate verify failed" in info.value.message and info.value.err_payload is None
