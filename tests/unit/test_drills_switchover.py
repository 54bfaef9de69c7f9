"""Planned switchover, pure: when it may start, which replica it promotes, the SQL text it runs."""

from __future__ import annotations

import pytest

from endpoint_proxy.drills.promotion_sql import (
    build_conninfo,
    change_master_sql,
    mysql_literal,
    parse_conninfo,
    pg_literal,
    rewrite_conninfo,
)
from endpoint_proxy.drills.switchover import SwitchoverRecord, SwitchoverRefused, plan_switchover
from endpoint_proxy.topology.state import ClusterTopology, ProbeResult


def topology(lags: dict[str, int | None], *, down: tuple[str, ...] = ()) -> ClusterTopology:
    """Writer "a" at LSN 1000; replicas with the given lag in bytes (None: not probed yet)."""
    topo = ClusterTopology(("a", *lags))
    topo.probe_succeeded("a", 1.0, result=ProbeResult(in_recovery=False, current_lsn=1000, timeline=1))
    for name, lag in lags.items():
        if lag is not None:
            topo.probe_succeeded(name, 1.0, result=ProbeResult(in_recovery=True, receive_lsn=1000 - lag,
                                                               replay_lsn=1000 - lag))
    for name in down:
        topo.probe_failed(name, 2.0, "refused")
    return topo


def test_picks_the_least_lagging_healthy_replica() -> None:
    plan = plan_switchover("app", topology({"b": 50, "c": 10, "d": 0}, down=("d",)), "sql", None)
    assert (plan.cluster, plan.old, plan.new) == ("app", "a", "c")


def test_ties_go_to_the_earlier_instance() -> None:
    assert plan_switchover("app", topology({"b": 0, "c": 0}), "sql", None).new == "b"


def test_a_named_candidate_is_used() -> None:
    assert plan_switchover("app", topology({"b": 0, "c": 500}), "command", "c").new == "c"


@pytest.mark.parametrize(("method", "to", "down", "message"), [
    ("none", None, (), 'not configured for cluster app: set \\[clusters.promotion\\] method = "sql"'),
    ("sql", "a", (), "a is already the writer"),
    ("sql", "zz", (), "no instance named 'zz'"),
    ("sql", "b", ("b",), "cannot promote b: it is down"),
    ("sql", None, ("b", "c"), "no healthy replica"),
])
def test_refusals(method: str, to: str | None, down: tuple[str, ...], message: str) -> None:
    with pytest.raises(SwitchoverRefused, match=message):
        plan_switchover("app", topology({"b": 0, "c": 0}, down=down), method, to)


def test_refused_without_a_writer_unless_one_is_named() -> None:
    topo = topology({"b": 0}, down=("a",))
    with pytest.raises(SwitchoverRefused, match="no known writer"):
        plan_switchover("app", topo, "sql", None)
    # A simulated failure of the writer: the drill names the writer it switches over from.
    assert plan_switchover("app", topo, "sql", None, writer="a").new == "b"


def test_a_fenced_old_writer_is_not_a_candidate() -> None:
    topo = topology({"b": 0})
    topo.probe_succeeded("b", 3.0, result=ProbeResult(in_recovery=False, current_lsn=2000, timeline=2))
    assert topo.writer == "b" and topo.instances["a"].fenced
    with pytest.raises(SwitchoverRefused, match="cannot promote a: it is fenced"):
        plan_switchover("app", topo, "sql", "a")


def test_record_json() -> None:
    record = SwitchoverRecord("app", "a", "b", "completed", 120, 1000.5, "", "requested")
    assert record.ok
    assert record.to_json() == {"cluster": "app", "from": "a", "to": "b", "outcome": "completed", "pause_ms": 120,
                                "at": 1000.5, "detail": "", "reason": "requested"}


@pytest.mark.parametrize(("text", "pairs"), [
    ("host=10.0.0.1 port=5432 user=replicator", [("host", "10.0.0.1"), ("port", "5432"), ("user", "replicator")]),
    ("  host = a   port=1 ", [("host", "a"), ("port", "1")]),
    ("password='it''s' x=1", None),
    (r"password='it\'s a \\ pw' application_name=b", [("password", "it's a \\ pw"), ("application_name", "b")]),
    (r"password=a\ b", [("password", "a b")]),
    ("", []),
])
def test_parse_conninfo(text: str, pairs: list[tuple[str, str]] | None) -> None:
    if pairs is None:
        with pytest.raises(ValueError):
            parse_conninfo(text)
    else:
        assert parse_conninfo(text) == pairs


def test_rewrite_conninfo_keeps_everything_but_the_address() -> None:
    before = ("user=replicator password='s3 cr\\'et' host=10.0.0.1 hostaddr=10.0.0.1 port=5432 "
              "application_name=pg2 sslmode=require")
    after = rewrite_conninfo(before, "10.0.0.2", 5433)
    assert parse_conninfo(after) == [("host", "10.0.0.2"), ("port", "5433"), ("user", "replicator"),
                                     ("password", "s3 cr'et"), ("application_name", "pg2"), ("sslmode", "require")]
    renamed = rewrite_conninfo(before, "h", 1, application_name="pg0")
    assert dict(parse_conninfo(renamed))["application_name"] == "pg0"


def test_rewrite_conninfo_uri() -> None:
    uri = "postgresql://rep:pw@old-host:5432/?application_name=pg2&sslmode=require"
    assert rewrite_conninfo(uri, "new-host", 6543) == \
        "postgresql://rep:pw@new-host:6543/?application_name=pg2&sslmode=require"
    assert rewrite_conninfo(uri, "::1", 1, application_name="x") == \
        "postgresql://rep:pw@[::1]:1/?sslmode=require&application_name=x"


def test_build_conninfo() -> None:
    assert parse_conninfo(build_conninfo("h", 5, "rep", "p w", "pg1")) == [
        ("host", "h"), ("port", "5"), ("user", "rep"), ("password", "p w"), ("application_name", "pg1")]


def test_literals_escape_quotes_and_backslashes() -> None:
    assert pg_literal("it's a \\") == "E'it\\'s a \\\\'"
    assert mysql_literal("it's a \\") == "'it\\'s a \\\\'"


def test_change_master() -> None:
    assert change_master_sql("10.0.0.2", 3306) == \
        "CHANGE MASTER TO MASTER_HOST='10.0.0.2', MASTER_PORT=3306, MASTER_USE_GTID=slave_pos"
    assert change_master_sql("h", 1, "rep", "p'w") == (
        "CHANGE MASTER TO MASTER_HOST='h', MASTER_PORT=1, MASTER_USER='rep', MASTER_PASSWORD='p\\'w', "
        "MASTER_USE_GTID=slave_pos")
