"""MySQL protocol through the proxy: pymysql and sysbench against a real MariaDB primary + 2 replicas."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from pymysql.constants import CLIENT

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from tests.fixtures.proxy import ProxyProcess, wait_until

pytestmark = pytest.mark.integration


def connect(proxy: ProxyProcess, endpoint: str, cluster: MariaDBCluster, **kw: Any) -> pymysql.Connection:
    kw.setdefault("user", cluster.app_user)
    kw.setdefault("password", cluster.app_password)
    kw.setdefault("database", cluster.database)
    return pymysql.connect(host="127.0.0.1", port=proxy.port(endpoint), connect_timeout=10, read_timeout=30,
                           **kw)


def one(conn: pymysql.Connection, sql: str, args: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
        return row[0] if row else None


@pytest.fixture
def writer_conn(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> Iterator[pymysql.Connection]:
    conn = connect(my_proxy, "writer", my_cluster, autocommit=True)
    yield conn
    conn.close()


def test_each_endpoint_lands_where_it_should(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    primary = my_cluster.instance(my_cluster.primary_name).port
    names = [i.name for i in my_cluster.instances]
    replicas = {my_cluster.instance(n).port for n in names if n != my_cluster.primary_name}

    def port(endpoint: str) -> int:
        conn = connect(my_proxy, endpoint, my_cluster)
        try:
            return int(one(conn, "SELECT @@port"))
        finally:
            conn.close()

    assert port("writer") == primary
    held = [connect(my_proxy, "reader", my_cluster) for _ in range(4)]
    try:
        assert {int(one(c, "SELECT @@port")) for c in held} == replicas
    finally:
        for c in held:
            c.close()
    assert port("inst1") == my_cluster.instance(names[1]).port
    assert port("custom_r") == my_cluster.instance(names[1]).port


def test_queries_results_and_errors(writer_conn: pymysql.Connection) -> None:
    with writer_conn.cursor() as cur:
        cur.execute("REPLACE INTO items VALUES (1, 'one'), (2, 'two')")
        cur.execute("SELECT v FROM items WHERE id = %s", (2,))
        assert cur.fetchone() == ("two",)
        cur.execute("SELECT seq, REPEAT('x', 40) FROM seq_1_to_20000")
        rows = cur.fetchall()
        assert len(rows) == 20000 and rows[-1][0] == 20000
        with pytest.raises(pymysql.err.ProgrammingError) as info:
            cur.execute("SELECT * FROM no_such_table")
        assert info.value.args[0] == 1146
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT REPEAT('y', 17000000)")  # a row over 16 MiB: split packets
        assert len(cur.fetchone()[0]) == 17000000


def test_multi_statements_and_transactions(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    conn = connect(my_proxy, "writer", my_cluster, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1; SELECT 2, 3; DO 1")
            assert cur.fetchall() == ((1,),)
            assert cur.nextset()
            assert cur.fetchall() == ((2, 3),)
        conn.begin()
        with conn.cursor() as cur:
            cur.execute("REPLACE INTO items VALUES (3, 'tx')")
        conn.rollback()
        assert one(conn, "SELECT COUNT(*) FROM items WHERE id = 3") == 0
    finally:
        conn.close()


def test_wrong_password_unknown_user_and_sha2(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(my_proxy, "writer", my_cluster, password="nope")
    assert info.value.args[0] == 1045
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(my_proxy, "writer", my_cluster, user="nobody", password="x")
    assert info.value.args[0] == 1045
    # caching_sha2_password between client and proxy (the server itself has no such plugin)
    conn = connect(my_proxy, "writer", my_cluster, user="sha2user", password="sha2-secret")
    try:
        assert one(conn, "SELECT CURRENT_USER()").startswith("sha2user@")
    finally:
        conn.close()
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(my_proxy, "writer", my_cluster, user="sha2user", password="bad")
    assert info.value.args[0] == 1045


def test_load_data_local_refused_unless_enabled(my_proxy: ProxyProcess, my_cluster: MariaDBCluster,
                                                tmp_path: Path) -> None:
    data = tmp_path / "rows.tsv"
    data.write_text("10\tten\n11\televen\n")
    sql = f"LOAD DATA LOCAL INFILE '{data}' REPLACE INTO TABLE items"
    conn = connect(my_proxy, "writer", my_cluster, local_infile=True, autocommit=True)
    try:
        with pytest.raises(pymysql.err.MySQLError):
            with conn.cursor() as cur:
                cur.execute(sql)
        assert one(conn, "SELECT 1") == 1
    finally:
        conn.close()
    conn = connect(my_proxy, "infile", my_cluster, local_infile=True, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
        assert one(conn, "SELECT v FROM items WHERE id = 11") == "eleven"
    finally:
        conn.close()


def test_kill_query_reaches_the_right_backend(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    victim = connect(my_proxy, "writer", my_cluster)
    killer = connect(my_proxy, "writer", my_cluster)
    try:
        thread_id = one(victim, "SELECT CONNECTION_ID()")
        result: dict[str, Any] = {}

        def sleep() -> None:
            started = time.monotonic()
            try:
                result["value"] = one(victim, "SELECT SLEEP(20)")
            except pymysql.err.OperationalError as e:
                result["value"] = e.args[0]
            result["took"] = time.monotonic() - started

        t = threading.Thread(target=sleep)
        t.start()
        wait_until(lambda: one(killer, "SELECT COUNT(*) FROM information_schema.processlist "
                                       "WHERE info = 'SELECT SLEEP(20)'") == 1, 10, "the query to run")
        with killer.cursor() as cur:
            cur.execute(f"KILL QUERY {thread_id}")
        t.join(15)
        assert result["took"] < 10
        assert result["value"] in (1, 1317)  # SLEEP() returns 1, or the query is "interrupted" (1317)
        assert one(victim, "SELECT 2") == 2
    finally:
        victim.close()
        killer.close()


def _raw(proxy: ProxyProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port("writer")), timeout=10)
    s.settimeout(10)
    greeting = s.recv(65536)
    assert greeting[4] == 10  # protocol version 10
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return out
        if not data:
            return out
        out += data


def test_malformed_packets_are_refused_cleanly(my_proxy: ProxyProcess, my_cluster: MariaDBCluster,
                                               writer_conn: pymysql.Connection) -> None:
    # a truncated HandshakeResponse41
    with _raw(my_proxy) as s:
        s.sendall(struct.pack("<I", 5)[:3] + b"\x01" + b"\x00\x82\x00\x00\x00")
        answer = _read_all(s)
        assert answer[4] == 0xFF  # an ERR packet, then the close
    # a huge length field before login: closed without an allocation of that size
    with _raw(my_proxy) as s:
        s.sendall(b"\xff\xff\xff\x01" + b"\x00" * 16)
        answer = _read_all(s)
        assert answer == b"" or answer[4] == 0xFF
    # a bad length-encoded integer in the response (0xFF where the auth length goes)
    with _raw(my_proxy) as s:
        payload = struct.pack("<IIB", 0x000FA685 | (1 << 21), 1 << 24, 45) + bytes(23) + b"app\x00" + b"\xff"
        s.sendall(len(payload).to_bytes(3, "little") + b"\x01" + payload)
        answer = _read_all(s)
        assert answer == b"" or answer[4] == 0xFF
    # the other session never noticed
    assert one(writer_conn, "SELECT 42") == 42


def test_readwrite_splits_and_pins(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    primary = my_cluster.instance(my_cluster.primary_name).port
    conn = connect(my_proxy, "rw", my_cluster, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("REPLACE INTO items VALUES (20, 'rw')")
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] != primary
            cur.execute("SELECT @@port FROM items WHERE id = 20 FOR UPDATE")
            assert cur.fetchone()[0] == primary
            cur.execute("SELECT LAST_INSERT_ID(), @@port")
            assert cur.fetchone()[1] == primary
        conn.begin()
        assert one(conn, "SELECT @@port") == primary
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("SET @mark = 7, time_zone = '+03:00'")
            cur.execute("SELECT @mark, @@time_zone, @@port")
            mark, zone, port = cur.fetchone()
            assert (mark, zone) == (7, "+03:00") and port != primary  # a literal value is replayed on the replica
            cur.execute("SET @token = UUID()")  # a value only this server has: the session stays on the writer
            cur.execute("SELECT @token IS NOT NULL, @@port")
            assert cur.fetchone() == (1, primary)
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] == primary
    finally:
        conn.close()


def test_backslashes_are_read_in_the_sessions_sql_mode(my_proxy: ProxyProcess, my_cluster: MariaDBCluster,
                                                       writer_conn: pymysql.Connection) -> None:
    # With backslash escapes, this is one SELECT of one string; under NO_BACKSLASH_ESCAPES the string ends at the
    # backslash and a DELETE follows. The proxy must read it as the server will, and send it to the writer.
    writer_conn.cursor().execute("REPLACE INTO items VALUES (77, 'smuggled')")
    conn = connect(my_proxy, "rw", my_cluster, autocommit=True, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
            cur.execute("SELECT 'a\\'; DELETE FROM items WHERE id = 77; -- '")
            while cur.nextset():
                pass
    finally:
        conn.close()
    assert one(writer_conn, "SELECT COUNT(*) FROM items WHERE id = 77") == 0


def test_session_consistency_reads_its_writes(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    conn = connect(my_proxy, "rw_session", my_cluster, autocommit=True)
    try:
        for i in range(50):
            with conn.cursor() as cur:
                cur.execute("REPLACE INTO items VALUES (30, %s)", (str(i),))
                cur.execute("SELECT v FROM items WHERE id = 30")
                assert cur.fetchone() == (str(i),)
    finally:
        conn.close()


def _sysbench(my_proxy: ProxyProcess, my_cluster: MariaDBCluster, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["sysbench", "--db-driver=mysql", "--mysql-host=127.0.0.1", f"--mysql-port={my_proxy.port('rw')}",
            f"--mysql-user={my_cluster.app_user}", f"--mysql-password={my_cluster.app_password}",
            f"--mysql-db={my_cluster.database}", "--tables=2", "--table-size=10000"]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=180)


def test_sysbench_oltp_read_write_with_server_side_prepared_statements(
        my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    prepared = _sysbench(my_proxy, my_cluster, "oltp_read_write", "prepare")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    try:
        # Only deadlocks (1213) may be retried: oltp_read_write's own contention produces a few
        # against the server directly too. Any other error aborts the run (non-zero exit).
        out = _sysbench(my_proxy, my_cluster, "oltp_read_write", "--db-ps-mode=auto", "--threads=4",
                        "--events=400", "--time=0", "--mysql-ignore-errors=1213", "run")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "FATAL" not in out.stdout + out.stderr
        assert "reconnects:                          0" in out.stdout, out.stdout
        assert "transactions:                        400" in out.stdout, out.stdout
    finally:
        _sysbench(my_proxy, my_cluster, "oltp_read_write", "cleanup")


def _packet(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    length = int.from_bytes(head[:3], "little")
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    return head[3], body


def _raw_login(proxy: ProxyProcess, endpoint: str, cluster: MariaDBCluster, caps: int) -> socket.socket:
    from endpoint_proxy.protocol.mysql.auth import BackendAuthenticator
    from endpoint_proxy.protocol.mysql.framing import encode_packet
    from endpoint_proxy.protocol.mysql.handshake import HandshakeResponse41, decode_handshake_v10

    s = socket.create_connection(("127.0.0.1", proxy.port(endpoint)), timeout=10)
    _, greeting = _packet(s)
    hello = decode_handshake_v10(greeting)
    auth = BackendAuthenticator(cluster.app_user, cluster.app_password, capabilities=caps)
    plugin, response = auth.start(hello.auth_plugin_name, hello.auth_plugin_data)
    s.sendall(encode_packet(1, HandshakeResponse41(caps, cluster.app_user, response, cluster.database, plugin,
                                                   character_set=45).encode()))
    assert _packet(s)[1][0] == 0x00
    return s


def test_set_option_follows_the_session_to_the_replica(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    """COM_SET_OPTION (multi-statements on) sent on the writer backend applies on the reader too."""
    from endpoint_proxy.protocol.mysql import commands as c
    from endpoint_proxy.protocol.mysql import constants as k
    from endpoint_proxy.protocol.mysql.framing import encode_packet

    caps = (k.CLIENT_PROTOCOL_41 | k.CLIENT_SECURE_CONNECTION | k.CLIENT_PLUGIN_AUTH | k.CLIENT_CONNECT_WITH_DB
            | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | k.CLIENT_TRANSACTIONS | k.CLIENT_MULTI_RESULTS
            | k.CLIENT_DEPRECATE_EOF)
    with _raw_login(my_proxy, "rw", my_cluster, caps) as s:
        s.sendall(encode_packet(0, bytes((c.COM_QUERY,)) + b"DO 1"))  # a write: the writer backend
        assert _packet(s)[1][0] == 0x00
        s.sendall(encode_packet(0, bytes((c.COM_SET_OPTION,)) + (0).to_bytes(2, "little")))
        assert _packet(s)[1][0] in (0x00, 0xFE)
        # a read: the reader backend, which must have been given the option too
        s.sendall(encode_packet(0, bytes((c.COM_QUERY,)) + b"SELECT 1; SELECT 2"))
        first = _packet(s)[1]
        assert first[0] != 0xFF, first


def test_change_user_reauthenticates_and_resets(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    """COM_CHANGE_USER (pymysql has none): app -> sha2user, whose method needs an auth switch."""
    from endpoint_proxy.protocol.mysql import commands as c
    from endpoint_proxy.protocol.mysql import constants as k
    from endpoint_proxy.protocol.mysql.auth import BackendAuthenticator
    from endpoint_proxy.protocol.mysql.framing import encode_packet, read_row_value
    from endpoint_proxy.protocol.mysql.handshake import HandshakeResponse41, decode_handshake_v10

    caps = (k.CLIENT_PROTOCOL_41 | k.CLIENT_SECURE_CONNECTION | k.CLIENT_PLUGIN_AUTH | k.CLIENT_CONNECT_WITH_DB
            | k.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | k.CLIENT_TRANSACTIONS)
    with socket.create_connection(("127.0.0.1", my_proxy.port("writer")), timeout=10) as s:
        _, greeting = _packet(s)
        hello = decode_handshake_v10(greeting)
        auth = BackendAuthenticator(my_cluster.app_user, my_cluster.app_password, capabilities=caps)
        plugin, response = auth.start(hello.auth_plugin_name, hello.auth_plugin_data)
        login = HandshakeResponse41(caps, my_cluster.app_user, response, my_cluster.database, plugin,
                                    character_set=45)
        s.sendall(encode_packet(1, login.encode()))
        seq, body = _packet(s)
        assert body[0] == 0x00, body  # OK

        def query(sql: str) -> str | None:
            s.sendall(encode_packet(0, bytes((c.COM_QUERY,)) + sql.encode()))
            packets = [_packet(s)[1] for _ in range(4)]  # column count, definition, EOF, row
            value, _ = read_row_value(packets[3], 0)
            while _packet(s)[1][0] != 0xFE:  # the closing EOF
                pass
            return None if value is None else value.decode()

        s.sendall(encode_packet(0, bytes((c.COM_QUERY,)) + b"SET @before = 1"))
        assert _packet(s)[1][0] == 0x00
        switch = BackendAuthenticator("sha2user", "sha2-secret", capabilities=caps)
        plugin, response = switch.start("mysql_native_password", hello.auth_plugin_data)
        change = c.ComChangeUser("sha2user", response, my_cluster.database, 45, plugin)
        s.sendall(encode_packet(0, change.encode(caps)))
        while True:
            seq, body = _packet(s)
            if body[0] in (0x00, 0xFF):
                break
            answer = switch.respond(body)
            if answer is not None:
                s.sendall(encode_packet(seq + 1, answer))
        assert body[0] == 0x00, body
        assert (query("SELECT CURRENT_USER()") or "").startswith("sha2user@")
        assert query("SELECT @before") is None  # the session started over


def test_tls_and_caching_sha2_over_it(my_proxy: ProxyProcess, my_cluster: MariaDBCluster) -> None:
    ca = my_proxy.doc["tls"]["cert_file"]
    for user, password in ((my_cluster.app_user, my_cluster.app_password), ("sha2user", "sha2-secret")):
        conn = connect(my_proxy, "writer", my_cluster, user=user, password=password, ssl_ca=ca,
                       ssl_verify_cert=True)
        try:
            assert isinstance(conn._sock, ssl.SSLSocket)
            assert one(conn, "SELECT 1") == 1
        finally:
            conn.close()
    plain = connect(my_proxy, "writer", my_cluster, ssl_disabled=True)
    try:
        assert not isinstance(plain._sock, ssl.SSLSocket)
        assert one(plain, "SELECT 2") == 2
    finally:
        plain.close()
