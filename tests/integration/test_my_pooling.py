"""MySQL transaction mode (pool_mode = "transaction") against a real MariaDB primary + 2 replicas: many pymysql
clients and sysbench on a few server connections, each client seeing only its own state; pins; borrow timeouts;
KILL of a proxy-assigned thread id."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.protocol.mysql.framing import read_row_value
from tests.fixtures.proxy import ProxyProcess, free_port, my_proxy_config, wait_until

pytestmark = pytest.mark.integration

POOL_SIZE = 4
# Only the pooled endpoints use these users: the server's connections of each are one pool's.
USER, PASSWORD = "pooluser", "pool-secret"
BENCH_USER, BENCH_PASSWORD = "benchuser", "bench-secret"
TIGHT_USER, TIGHT_PASSWORD = "tightuser", "tight-secret"
COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_CLOSE, COM_RESET_CONNECTION = 0x16, 0x17, 0x19, 0x1F


@pytest.fixture(scope="module")
def pool_proxy(my_cluster: MariaDBCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    primary = my_cluster.primary_name
    statements = ["CREATE DATABASE IF NOT EXISTS pool_other", "CREATE DATABASE IF NOT EXISTS pool_bench"]
    for user, password in ((USER, PASSWORD), (BENCH_USER, BENCH_PASSWORD), (TIGHT_USER, TIGHT_PASSWORD)):
        statements += [f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{password}'"]
        statements += [f"GRANT ALL ON {db}.* TO '{user}'@'%'"
                       for db in (my_cluster.database, "pool_other", "pool_bench")]
    my_cluster.sql(primary, "; ".join(statements))
    my_cluster.sql(primary, "CREATE TABLE IF NOT EXISTS pool_other.marker (v INT); "
                            "CREATE TABLE IF NOT EXISTS pool_items (id INT PRIMARY KEY, v INT)")
    my_cluster.wait_caught_up(*[i.name for i in my_cluster.instances if i.name != primary])
    base = my_proxy_config(my_cluster)["clusters"][0]
    pooled = dict(base, name="pooled", pool_size=POOL_SIZE, borrow_timeout_ms=30_000,
                  users=[{"name": USER, "password": PASSWORD}, {"name": BENCH_USER, "password": BENCH_PASSWORD}],
                  endpoints=[{"name": "tx", "listen": f"127.0.0.1:{free_port()}", "kind": "writer",
                              "pool_mode": "transaction"},
                             {"name": "tx_rw", "listen": f"127.0.0.1:{free_port()}", "kind": "readwrite",
                              "pool_mode": "transaction"},
                             {"name": "tx_rw_session", "listen": f"127.0.0.1:{free_port()}", "kind": "readwrite",
                              "pool_mode": "transaction", "consistency": "session", "session_wait_ms": 200}])
    tight = dict(base, name="tight", pool_size=1, borrow_timeout_ms=300,
                 users=[{"name": TIGHT_USER, "password": TIGHT_PASSWORD}],
                 endpoints=[{"name": "tight", "listen": f"127.0.0.1:{free_port()}", "kind": "writer",
                             "pool_mode": "transaction"}])
    doc = {"logging": {"format": "json", "level": "info"}, "server": {"startup_timeout_ms": 5000},
           "clusters": [pooled, tight]}
    with ProxyProcess(doc, tmp_path_factory.mktemp("mypool")) as proxy:
        yield proxy


def connect(proxy: ProxyProcess, endpoint: str = "tx", **kw: Any) -> pymysql.Connection:
    user, password = (TIGHT_USER, TIGHT_PASSWORD) if endpoint == "tight" else (USER, PASSWORD)
    user, password = kw.pop("user", user), kw.pop("password", password)
    kw.setdefault("database", "app")
    return pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), user=user, password=password,
                           connect_timeout=10, read_timeout=60, autocommit=True, **kw)


def one(conn: pymysql.Connection, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        return row[0] if row else None


def root(cluster: MariaDBCluster) -> pymysql.Connection:
    inst = cluster.instance(cluster.primary_name)
    return pymysql.connect(unix_socket=str(inst.socket), user="root", autocommit=True)


def server_connections(conn: pymysql.Connection, user: str) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (user,))
        return int(cur.fetchone()[0])


# --- server-side prepared statements, as pymysql has none (COM_STMT_*, EOF-terminated: pymysql does not ask
# for CLIENT_DEPRECATE_EOF) ---


def stmt_prepare(conn: pymysql.Connection, sql: str) -> int:
    conn._execute_command(COM_STMT_PREPARE, sql)
    head = conn._read_packet().get_all_data()
    sid = int.from_bytes(head[1:5], "little")
    columns, params = int.from_bytes(head[5:7], "little"), int.from_bytes(head[7:9], "little")
    for count in (params, columns):
        for _ in range(count + (1 if count else 0)):  # the definitions, then an EOF
            conn._read_packet()
    return sid


def stmt_execute(conn: pymysql.Connection, sid: int, *args: str) -> list[tuple[str | None, ...]]:
    """Execute with string arguments; every column is read as a string."""
    payload = bytearray(sid.to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little"))
    if args:
        payload += bytes((len(args) + 7) // 8) + b"\x01" + b"\xfd\x00" * len(args)
        for arg in args:
            data = arg.encode()
            payload += bytes((len(data),)) + data
    conn._execute_command(COM_STMT_EXECUTE, bytes(payload))
    first = conn._read_packet()  # (pymysql raises for an ERR)
    columns = first.get_all_data()[0]
    for _ in range(columns + 1):  # definitions, EOF
        conn._read_packet()
    rows = []
    while True:
        packet = conn._read_packet()
        if packet.is_eof_packet():
            return rows
        data = packet.get_all_data()
        bitmap = data[1:1 + (columns + 9) // 8]
        pos = 1 + len(bitmap)
        row: list[str | None] = []
        for i in range(columns):
            if bitmap[(i + 2) // 8] & (1 << ((i + 2) % 8)):
                row.append(None)
                continue
            value, pos = read_row_value(data, pos)
            row.append(None if value is None else value.decode())
        rows.append(tuple(row))


def stmt_close(conn: pymysql.Connection, sid: int) -> None:
    conn._execute_command(COM_STMT_CLOSE, sid.to_bytes(4, "little"))  # no answer


class Watch:
    """Polls the primary for the server connections of ``user``; ``peak`` is the most seen at once."""

    def __init__(self, cluster: MariaDBCluster, user: str) -> None:
        self.conn = root(cluster)
        self.user = user
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_connections(self.conn, self.user))
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.conn.close()


# --- many clients, few connections ----------------------------------------------------------------------


def test_forty_clients_on_four_connections_each_see_only_their_own_state(
        pool_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    clients, rounds = 40, 6
    failures: list[str] = []
    thread_ids: set[int] = set()
    counts = {"statements": 0}

    def client(i: int) -> None:
        try:
            conn = connect(pool_proxy)
            thread_ids.add(conn.thread_id())
            sid = stmt_prepare(conn, "SELECT CONCAT(?, ':', IFNULL(@mine, '-'), ':', DATABASE(), ':', @@time_zone)")
            with conn.cursor() as cur:
                for n in range(rounds):
                    mine, db, tz = f"{i}.{n}", ("pool_other" if (i + n) % 2 else "app"), f"+0{i % 10}:00"
                    cur.execute(f"SET @mine = '{mine}'")
                    cur.execute(f"SET time_zone = '{tz}'")
                    cur.execute(f"USE {db}")
                    cur.execute("SELECT @mine, DATABASE(), @@time_zone")
                    got = cur.fetchone()
                    if got != (mine, db, tz):
                        failures.append(f"client {i} round {n}: {got} != {(mine, db, tz)}")
                    rows = stmt_execute(conn, sid, str(n))
                    # (a prepared statement runs in the database it was prepared in, as directly: wherever
                    # the proxy prepares it again, it does so in that database)
                    if rows != [(f"{n}:{mine}:app:{tz}",)]:
                        failures.append(f"client {i} round {n}: prepared {rows}")
                    cur.execute("BEGIN")
                    cur.execute("SELECT @mine FOR UPDATE" if n % 3 == 0 else "SELECT @mine")
                    if cur.fetchone() != (mine,):
                        failures.append(f"client {i} round {n}: in a transaction")
                    cur.execute("COMMIT")
                    counts["statements"] += 9
            stmt_close(conn, sid)
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"client {i}: {e!r}")

    with Watch(my_cluster, USER) as watch:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        elapsed = time.monotonic() - started
        time.sleep(0.1)
    assert not failures, "\n".join(failures[:20])
    assert 0 < watch.peak <= POOL_SIZE, watch.peak
    # the handshake's thread ids are the proxy's own, one per client
    assert len(thread_ids) == clients and min(thread_ids) >= 1_000_000_000
    print(f"{clients} clients, {counts['statements']} statements in {elapsed:.1f} s; "
          f"at most {watch.peak} server connections ({watch.samples} samples)")


def _sysbench(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["sysbench", "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={proxy.port('tx')}",
            f"--mysql-user={BENCH_USER}", f"--mysql-password={BENCH_PASSWORD}", "--mysql-db=pool_bench", "--tables=2",
            "--table-size=2000"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=300)


def test_sysbench_with_prepared_statements_on_a_pool_of_four(pool_proxy: ProxyProcess,
                                                           my_cluster: MariaDBCluster) -> None:
    prepared = _sysbench(pool_proxy, "oltp_read_write", "prepare")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    try:
        with Watch(my_cluster, BENCH_USER) as watch:
            # Only deadlocks (1213) may be retried: oltp_read_write's own contention produces a few against the
            # server directly too. Any other error aborts the run (non-zero exit).
            out = _sysbench(pool_proxy, "oltp_read_write", "--db-ps-mode=auto", "--threads=16", "--events=800",
                            "--time=0", "--mysql-ignore-errors=1213", "run")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "FATAL" not in out.stdout + out.stderr
        assert "reconnects:                          0" in out.stdout, out.stdout
        assert "transactions:                        800" in out.stdout, out.stdout
        assert 0 < watch.peak <= POOL_SIZE, watch.peak
        summary = [line.strip() for line in out.stdout.splitlines() if "per sec" in line or "ignored" in line]
        print(f"sysbench 16 threads on {POOL_SIZE} connections (at most {watch.peak} seen): {summary}")
    finally:
        _sysbench(pool_proxy, "oltp_read_write", "cleanup")


# --- pins -------------------------------------------------------------------------------------------------


def _expect_timeout(conn: pymysql.Connection) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        one(conn, "SELECT 1")
    assert info.value.args[0] == 1040 and "borrow_timeout_ms" in info.value.args[1]


def test_a_borrow_timeout_is_1040_and_the_session_goes_on(pool_proxy: ProxyProcess) -> None:
    holder, waiter = connect(pool_proxy, "tight"), connect(pool_proxy, "tight")
    try:
        one(holder, "BEGIN")
        started = time.monotonic()
        _expect_timeout(waiter)
        assert 0.25 < time.monotonic() - started < 5
        one(holder, "COMMIT")
        assert one(waiter, "SELECT 1") == 1  # the same client connection, usable
    finally:
        holder.close()
        waiter.close()


def test_a_temporary_table_pins_until_reset_and_otherwise_its_connection_is_closed(
        pool_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    pinned, other = connect(pool_proxy, "tight"), connect(pool_proxy, "tight")
    watcher = root(my_cluster)
    try:
        one(pinned, "CREATE TEMPORARY TABLE tt (a INT)")
        one(pinned, "INSERT INTO tt VALUES (1)")
        thread = one(pinned, "SELECT CONNECTION_ID()")
        assert one(pinned, "SELECT COUNT(*) FROM tt") == 1
        _expect_timeout(other)  # the one connection stays with the pinned session
        # COM_RESET_CONNECTION drops the table and lets go of the connection
        pinned._execute_command(COM_RESET_CONNECTION, b"")
        pinned._read_ok_packet()
        assert one(other, "SELECT 1") == 1
        with pytest.raises(pymysql.err.ProgrammingError):
            one(pinned, "SELECT COUNT(*) FROM tt")
        # a session that leaves with its temporary table: the connection is closed, not handed on
        one(pinned, "CREATE TEMPORARY TABLE tt (a INT)")
        thread = one(pinned, "SELECT CONNECTION_ID()")
        pinned.close()
        with watcher.cursor() as cur:
            def gone() -> bool:
                cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (thread,))
                return cur.fetchone()[0] == 0
            wait_until(gone, 10, "the pinned connection to close")
        assert one(other, "SELECT CONNECTION_ID()") != thread
        with pytest.raises(pymysql.err.ProgrammingError):
            one(other, "SELECT COUNT(*) FROM tt")
    finally:
        other.close()
        watcher.close()


@pytest.mark.parametrize(("take", "release"), [
    ("LOCK TABLES pool_items WRITE", "UNLOCK TABLES"),
    ("SELECT GET_LOCK('pool_test', 0)", "SELECT RELEASE_ALL_LOCKS()"),
])
def test_a_lock_pins_until_released(pool_proxy: ProxyProcess, take: str, release: str) -> None:
    pinned, other = connect(pool_proxy, "tight"), connect(pool_proxy, "tight")
    try:
        one(pinned, take)
        _expect_timeout(other)
        one(pinned, release)
        assert one(other, "SELECT 1") == 1  # the connection went back to the pool
        assert one(pinned, "SELECT 2") == 2
    finally:
        pinned.close()
        other.close()


# --- thread ids, KILL, readwrite -------------------------------------------------------------------------


def test_kill_query_of_the_proxy_thread_id_reaches_the_borrowed_connection(pool_proxy: ProxyProcess) -> None:
    sleeper, killer = connect(pool_proxy), connect(pool_proxy)
    try:
        assert one(killer, f"KILL QUERY {sleeper.thread_id()}") is None  # nothing running: OK
        errors: list[BaseException] = []

        def sleep() -> None:
            try:
                one(sleeper, "SELECT SLEEP(20)")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=sleep)
        started = time.monotonic()
        t.start()
        time.sleep(0.5)
        one(killer, f"KILL QUERY {sleeper.thread_id()}")
        t.join(15)
        assert time.monotonic() - started < 10
        # MariaDB ends an interrupted SLEEP() early (result 1) or with 1317, both as directly
        assert not errors or getattr(errors[0], "args", (0,))[0] == 1317
        assert one(sleeper, "SELECT 3") == 3
    finally:
        sleeper.close()
        killer.close()


def test_only_its_user_may_kill_an_idle_pooled_session(pool_proxy: ProxyProcess) -> None:
    victim = connect(pool_proxy)
    stranger = connect(pool_proxy, user=BENCH_USER, password=BENCH_PASSWORD, database="pool_bench")
    owner = connect(pool_proxy)
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            one(stranger, f"KILL {victim.thread_id()}")
        assert info.value.args[0] == 1095
        assert one(victim, "SELECT 1") == 1
        one(owner, f"KILL CONNECTION {victim.thread_id()}")
        with pytest.raises(pymysql.err.OperationalError):
            one(victim, "SELECT 1")
    finally:
        for conn in (victim, stranger, owner):
            if conn.open:
                conn.close()


def test_readwrite_in_transaction_mode_carries_the_state_to_the_replica(pool_proxy: ProxyProcess,
                                                                      my_cluster: MariaDBCluster) -> None:
    replicas = {my_cluster.instance(i.name).port for i in my_cluster.instances if i.name != my_cluster.primary_name}
    conn = connect(pool_proxy, "tx_rw")
    try:
        one(conn, "SET @tenant = 42")
        one(conn, "USE pool_other")
        assert int(one(conn, "SELECT @@port")) in replicas
        with conn.cursor() as cur:
            cur.execute("SELECT @tenant, DATABASE(), @@port")
            tenant, db, port = cur.fetchone()
        assert (tenant, db) == (42, "pool_other") and int(port) in replicas
        one(conn, "INSERT INTO marker VALUES (1)")  # the writer, in pool_other
    finally:
        conn.close()


def test_session_consistency_in_transaction_mode_reads_its_writes(pool_proxy: ProxyProcess,
                                                                 my_cluster: MariaDBCluster) -> None:
    replicas = {my_cluster.instance(i.name).port for i in my_cluster.instances if i.name != my_cluster.primary_name}
    conn = connect(pool_proxy, "tx_rw_session")
    ports = []
    try:
        for i in range(40):
            with conn.cursor() as cur:
                cur.execute("REPLACE INTO pool_items VALUES (1, %s)", (i,))
                cur.execute("SELECT v, @@port FROM pool_items WHERE id = 1")
                v, port = cur.fetchone()
                assert v == i
                ports.append(int(port))
    finally:
        conn.close()
    assert set(ports) & replicas  # (read on a replica once it had replayed the write)


def test_change_user_starts_over_with_the_new_users_pool(pool_proxy: ProxyProcess) -> None:
    """COM_CHANGE_USER (pymysql has none): the session goes on as the other user, its state gone."""
    import socket

    from endpoint_proxy.protocol.mysql import commands as c
    from endpoint_proxy.protocol.mysql import constants as k
    from endpoint_proxy.protocol.mysql.auth import BackendAuthenticator
    from endpoint_proxy.protocol.mysql.framing import encode_packet
    from endpoint_proxy.protocol.mysql.handshake import HandshakeResponse41, decode_handshake_v10
    from tests.integration.test_my_endpoints import _packet

    caps = (k.CLIENT_PROTOCOL_41 | k.CLIENT_SECURE_CONNECTION | k.CLIENT_PLUGIN_AUTH | k.CLIENT_CONNECT_WITH_DB
            | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | k.CLIENT_TRANSACTIONS | k.CLIENT_DEPRECATE_EOF)
    with socket.create_connection(("127.0.0.1", pool_proxy.port("tx")), timeout=10) as s:
        _, greeting = _packet(s)
        hello = decode_handshake_v10(greeting)
        assert hello.connection_id >= 1_000_000_000  # the proxy's own thread id
        auth = BackendAuthenticator(USER, PASSWORD, capabilities=caps)
        plugin, response = auth.start(hello.auth_plugin_name, hello.auth_plugin_data)
        s.sendall(encode_packet(1, HandshakeResponse41(caps, USER, response, "app", plugin,
                                                       character_set=45).encode()))
        assert _packet(s)[1][0] == 0x00

        def value(sql: str) -> bytes | None:
            s.sendall(encode_packet(0, bytes((c.COM_QUERY,)) + sql.encode()))
            answer = [_packet(s)[1] for _ in range(3)]  # column count, definition, row
            assert _packet(s)[1][0] == 0xFE  # the closing OK
            row = answer[2]
            return None if row[:1] == b"\xfb" else row[1:1 + row[0]]

        s.sendall(encode_packet(0, bytes((c.COM_QUERY,)) + b"SET @before = 1"))
        assert _packet(s)[1][0] == 0x00
        assert value("SELECT @before") == b"1"
        switch = BackendAuthenticator(BENCH_USER, BENCH_PASSWORD, capabilities=caps)
        plugin, response = switch.start("mysql_native_password", hello.auth_plugin_data)
        s.sendall(encode_packet(0, c.ComChangeUser(BENCH_USER, response, "pool_bench", 45, plugin).encode(caps)))
        body = _packet(s)[1]
        assert body[0] == 0x00, body
        assert (value("SELECT CURRENT_USER()") or b"").startswith(BENCH_USER.encode() + b"@")
        assert value("SELECT DATABASE()") == b"pool_bench"
        assert value("SELECT @before") is None  # the session started over


def test_no_statement_of_the_proxys_when_sessions_carry_the_same_state(pool_proxy: ProxyProcess) -> None:
    """Two clients take turns on one server connection (pool_size 1): its own Questions counter shows
    exactly their statements while their states agree, and the proxy's few once they differ."""
    a, b = connect(pool_proxy, "tight"), connect(pool_proxy, "tight")

    def questions() -> int:
        with a.cursor() as cur:
            cur.execute("SHOW SESSION STATUS LIKE 'Questions'")  # (of the connection it runs on: the one)
            return int(cur.fetchone()[1])

    try:
        for conn in (a, b):
            one(conn, "SET sql_mode = 'STRICT_ALL_TABLES'")
            one(conn, "SET @tenant = 7")
        before = questions()
        for _ in range(5):
            one(b, "SELECT 1")
            one(a, "SELECT 1")
        same = questions() - before
        one(b, "SET @tenant = 8")  # now they differ: each turn brings @tenant over
        before = questions()
        for _ in range(5):
            one(b, "SELECT 1")
            one(a, "SELECT 1")
        different = questions() - before
    finally:
        a.close()
        b.close()
    assert same == 11  # ten SELECTs and the SHOW
    assert different == 21  # and a SET @tenant before each turn
