"""Real clients through a relay that cuts their streams into pieces, to the proxy and back, in
front of real servers: what a real network may do to the bytes must not change what a session
does (tests/sim runs the same flows at every byte boundary against scripted servers).

MySQL: pymysql in 1-byte and random pieces, with TLS and without: queries, errors,
transactions, multi-result sets (multi statements), LOAD DATA LOCAL refused and allowed, and
COM_STMT_* through a raw protocol client (pymysql has no server-side prepared statements).
PostgreSQL: issue 10's defect 1, a 4 kB INSERT after a SELECT on the readwrite endpoint, cut at
TCP segment sizes (it hung the session).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pymysql
import pytest
import trio
from pymysql.constants import CLIENT

from endpoint_proxy.localcluster.mariadb import MariaDBCluster
from endpoint_proxy.localcluster.postgresql import PostgresCluster
from endpoint_proxy.protocol.mysql.framing import read_lenenc_str
from endpoint_proxy.relay.net import connect_tcp
from tests.fixtures.proxy import ProxyProcess, my_proxy_config
from tests.fixtures.splitrelay import Piece, SplitRelay, random_pieces, segments
from tests.sim.myclient import Command, MyClient, close_statement, execute, packets, prepare, query

pytestmark = pytest.mark.integration

PIECES: dict[str, Piece] = {"1-byte": 1, "random": random_pieces(1, 200)}


@pytest.fixture(params=list(PIECES))
def my_relays(request: pytest.FixtureRequest, my_proxy: ProxyProcess) -> Iterator[dict[str, SplitRelay]]:
    """A splitting relay in front of the writer and the LOCAL INFILE endpoints of the proxy."""
    piece = PIECES[request.param]
    relays = {name: SplitRelay(("127.0.0.1", my_proxy.port(name)), piece=piece, pause_s=0.0002)
              for name in ("writer", "infile")}
    for relay in relays.values():
        relay.__enter__()
    yield relays
    for relay in relays.values():
        relay.__exit__(None, None, None)


def _connect(relay: SplitRelay, cluster: MariaDBCluster, proxy: ProxyProcess, tls: bool,
             **kw: Any) -> pymysql.Connection:
    if tls:
        kw.update(ssl_ca=proxy.doc["tls"]["cert_file"], ssl_verify_cert=True, ssl_verify_identity=False)
    else:
        kw["ssl_disabled"] = True
    return pymysql.connect(host="127.0.0.1", port=relay.port, user=cluster.app_user, password=cluster.app_password,
                           database=cluster.database, connect_timeout=20, read_timeout=30, write_timeout=30,
                           autocommit=True, **kw)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_mysql_queries_and_multi_results_in_pieces(my_relays: dict[str, SplitRelay], my_cluster: MariaDBCluster,
                                                   my_proxy: ProxyProcess, tls: bool) -> None:
    relay = my_relays["writer"]
    conn = _connect(relay, my_cluster, my_proxy, tls, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
            cur.execute("SELECT 1; SELECT 2, 'two'; REPLACE INTO items VALUES (70, 'seventy'); "
                        "SELECT v FROM items WHERE id = 70")
            results = [cur.fetchall()]
            while cur.nextset():
                results.append(cur.fetchall())
            assert [tuple(r) for r in results] == [((1,),), ((2, "two"),), (), (("seventy",),)], relay.dump()
            with pytest.raises(pymysql.err.ProgrammingError) as info:
                cur.execute("SELECT * FROM no_such_table")
            assert info.value.args[0] == 1146
            cur.execute("BEGIN")
            cur.execute("REPLACE INTO items VALUES (71, 'gone')")
            cur.execute("ROLLBACK")
            cur.execute("SELECT COUNT(*) FROM items WHERE id = 71")
            assert cur.fetchall() == ((0,),)
            cur.execute("SELECT seq, REPEAT('y', 20) FROM seq_1_to_200")
            assert len(cur.fetchall()) == 200
    finally:
        conn.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_mysql_load_data_local_in_pieces(my_relays: dict[str, SplitRelay], my_cluster: MariaDBCluster,
                                         my_proxy: ProxyProcess, tls: bool, tmp_path: Path) -> None:
    data = tmp_path / "rows.tsv"
    data.write_text("80\teighty\n81\teighty-one\n")
    sql = f"LOAD DATA LOCAL INFILE '{data}' REPLACE INTO TABLE items"
    conn = _connect(my_relays["writer"], my_cluster, my_proxy, tls, local_infile=True)
    try:
        with pytest.raises(pymysql.err.MySQLError):
            with conn.cursor() as cur:
                cur.execute(sql)
        with conn.cursor() as cur:  # refused, and the session goes on
            cur.execute("SELECT 1")
            assert cur.fetchall() == ((1,),)
    finally:
        conn.close()
    conn = _connect(my_relays["infile"], my_cluster, my_proxy, tls, local_infile=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            cur.execute("SELECT v FROM items WHERE id = 81")
            assert cur.fetchall() == (("eighty-one",),)
    finally:
        conn.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_mysql_prepared_statements_in_pieces(my_relays: dict[str, SplitRelay], my_cluster: MariaDBCluster,
                                             tls: bool) -> None:
    relay = my_relays["writer"]

    async def main() -> None:
        with trio.fail_after(60):
            client = MyClient(await connect_tcp("127.0.0.1", relay.port))
            await client.login(my_cluster.app_user, my_cluster.app_password, database=my_cluster.database, tls=tls)
            prepared = (await client.run([Command(prepare("SELECT CONCAT(?, '!')"))]))[0]
            assert prepared.tracker.prepare_ok is not None, prepared.raw
            sid = prepared.tracker.prepare_ok.statement_id
            for value in (b"one", b"two" * 100):
                answer = (await client.run([Command(execute(sid, value))]))[0]
                assert answer.tracker.error is None and answer.tracker.rows == 1, answer.raw
                assert _binary_string(answer.raw) == value + b"!"
            # Pipelined: a text query, an execute, a close, then an execute of the closed statement.
            answers = await client.run([Command(query("SELECT 5")), Command(execute(sid, b"p")),
                                        Command(close_statement(sid)), Command(execute(sid, b"q"))])
            assert [a.tracker.error.errno if a.tracker.error else 0 for a in answers] == [0, 0, 0, 1243]
            await client.aclose()

    trio.run(main)


@pytest.fixture(scope="module")
def my_proxy_behind_relays(my_cluster: MariaDBCluster,
                           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, list[SplitRelay]]]:
    """A proxy whose servers are reached through splitting relays: the servers' answers reach it
    in random pieces (the other tests cut only the client's side)."""
    relays = [SplitRelay((i.host, i.port), piece=random_pieces(1, 24), pause_s=0.0002, seed=n)
              for n, i in enumerate(my_cluster.instances)]
    for relay in relays:
        relay.__enter__()
    doc = my_proxy_config(my_cluster)
    for cluster_doc in doc["clusters"]:
        for inst, relay in zip(cluster_doc["instances"], relays, strict=True):
            inst["port"] = relay.port
    try:
        with ProxyProcess(doc, tmp_path_factory.mktemp("relayed-proxy")) as proxy:
            yield proxy, relays
    finally:
        for relay in relays:
            relay.__exit__(None, None, None)


def test_mysql_prepared_statements_with_servers_answering_in_pieces(
        my_proxy_behind_relays: tuple[ProxyProcess, list[SplitRelay]], my_cluster: MariaDBCluster) -> None:
    proxy, relays = my_proxy_behind_relays

    async def main() -> None:
        with trio.fail_after(60):
            client = MyClient(await connect_tcp("127.0.0.1", proxy.port("writer")))
            await client.login(my_cluster.app_user, my_cluster.app_password, database=my_cluster.database)
            for n in range(30):
                prepared = (await client.run([Command(prepare(f"SELECT CONCAT(?, '-{n}')"))]))[0]
                assert prepared.tracker.prepare_ok is not None, prepared.raw
                sid = prepared.tracker.prepare_ok.statement_id
                answer = (await client.run([Command(execute(sid, b"v"))]))[0]
                assert answer.tracker.error is None, (n, answer.raw, [r.dump() for r in relays])
                assert _binary_string(answer.raw) == f"v-{n}".encode()
                await client.run([Command(close_statement(sid))])
            answers = await client.run([Command(query("SELECT 1; SELECT n FROM no_such"))])
            assert answers[0].tracker.error is not None and answers[0].tracker.error.errno == 1146
            await client.aclose()

    trio.run(main)


def _binary_string(raw: bytes) -> bytes:
    """The string of a one-row, one-column binary result: column count, definition, the row
    (0x00, a one-byte NULL bitmap, the value), then the terminator."""
    row = packets(raw)[-2][1]
    value, _ = read_lenenc_str(row, 2)
    return bytes(value)


def test_pg_readwrite_4kb_insert_after_a_select_in_tcp_segments(pg_cluster: PostgresCluster,
                                                                 pg_proxy: ProxyProcess) -> None:
    # Issue 10, defect 1: after a SELECT on a replica, a 4 kB INSERT whose bytes came in several
    # reads hung the session. Cut at TCP segment sizes (and back), both protocols.
    big = "x" * 4000

    async def main(port: int) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=pg_cluster.app_user,
                                     password=pg_cluster.app_password, database=pg_cluster.database, ssl=False,
                                     timeout=20)
        try:
            await asyncio.wait_for(conn.execute("create table if not exists split_big (id int, v text)"), 20)
            for i in range(3):
                assert await asyncio.wait_for(conn.fetchval("select 1"), 20) == 1
                await asyncio.wait_for(conn.execute(f"insert into split_big values ({i}, '{big}')"), 20)
                await asyncio.wait_for(conn.execute("insert into split_big values ($1, $2)", 100 + i, big), 20)
            count = await asyncio.wait_for(conn.fetchval(
                "/* endpoint: writer */ select count(*) from split_big where length(v) = 4000"), 20)
            assert count >= 6
            await asyncio.wait_for(conn.execute("delete from split_big"), 20)
        finally:
            await conn.close()

    for piece in (segments(1400), segments(1460)):
        with SplitRelay(("127.0.0.1", pg_proxy.port("rw")), piece=piece, pause_s=0.002) as relay:
            asyncio.run(main(relay.port))
