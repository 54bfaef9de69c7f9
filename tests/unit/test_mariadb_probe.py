"""The MariaDB probe's pure half: GTID lists as positions, and a probe's answer as a ProbeResult."""

from __future__ import annotations

import pytest

from endpoint_proxy.topology.mariadb_probe import gtid_position, parse_gtid_list, parse_probe
from endpoint_proxy.topology.state import ClusterTopology, ProbeResult


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("  ", 0),
        ("0-1-42", 42),
        ("0-1-42,1-2-7", 49),
        ("0-1-42, 1-2-7", 49),
        ("0-1-42,\n1-2-7", 49),
        ("0-2-0", 0),
        (f"4294967295-4294967295-{2**64 - 1}", 2**64 - 1),
        ("7-1-1,3-1-1,5-1-1", 3),
    ],
)
def test_gtid_position(text: str, expected: int) -> None:
    assert gtid_position(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "0-1",
        "0-1-42-3",
        "a-b-c",
        "0-1-42,",
        ",0-1-42",
        "0-1--42",
        "-1-1-1",
        "0-1-4 2",
        "0-1-+42",
        "0-1-42,0-2-43",  # a domain twice: a binlog state, not a position
        f"0-1-{2**64}",
        f"{2**32}-1-1",
        "0-1-٣",  # a non-ASCII digit
        "0x1-1-1",
    ],
)
def test_gtid_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        gtid_position(text)


def test_gtid_list_by_domain() -> None:
    assert parse_gtid_list("0-1-42,1-2-7") == {0: 42, 1: 7}


def variables(read_only: str = "0", binlog: str = "0-1-42", slave: str = "", current: str = "0-1-42") -> dict[
    str, str | None
]:
    return {"read_only": read_only, "gtid_binlog_pos": binlog, "gtid_slave_pos": slave, "gtid_current_pos": current}


def slave(io: str = "Yes", sql: str = "Yes", behind: str | None = "0", io_pos: str = "0-1-42") -> dict[
    str, str | None
]:
    return {
        "Slave_IO_State": "Waiting for master to send event",
        "Slave_IO_Running": io,
        "Slave_SQL_Running": sql,
        "Seconds_Behind_Master": behind,
        "Gtid_IO_Pos": io_pos,
    }


@pytest.mark.parametrize(
    ("name", "vars_", "status", "expected"),
    [
        ("writer", variables(), None, ProbeResult(in_recovery=False, current_lsn=42)),
        ("writer, empty show slave status", variables(), {}, ProbeResult(in_recovery=False, current_lsn=42)),
        ("fresh writer", variables(binlog="", current=""), None, ProbeResult(in_recovery=False, current_lsn=0)),
        ("writer whose replication was stopped", variables(), slave(io="No", sql="No", behind=None),
         ProbeResult(in_recovery=False, current_lsn=42)),
        ("writer, read_only as an enum", variables(read_only="OFF"), None,
         ProbeResult(in_recovery=False, current_lsn=42)),
        ("replica running", variables("1", "0-1-42", "0-1-42", "0-1-42"), slave(),
         ProbeResult(in_recovery=True, receive_lsn=42, replay_lsn=42)),
        ("replica, primary away", variables("1", "0-1-42", "0-1-42", "0-1-42"),
         slave(io="Connecting", behind=None), ProbeResult(in_recovery=True, receive_lsn=42, replay_lsn=42)),
        ("replica stopped", variables("1", "0-1-40", "0-1-40", "0-1-40"),
         slave(io="No", sql="No", behind=None, io_pos="0-1-40"),
         ProbeResult(in_recovery=True, receive_lsn=40, replay_lsn=40)),
        ("replica lagging", variables("1", "0-1-30", "0-1-30", "0-1-30"), slave(behind="12", io_pos="0-1-42"),
         ProbeResult(in_recovery=True, receive_lsn=42, replay_lsn=30, replay_age_s=12.0)),
        ("replica SQL thread stopped", variables("1", "0-1-30", "0-1-30", "0-1-30"),
         slave(sql="No", behind=None, io_pos="0-1-42"),
         ProbeResult(in_recovery=True, receive_lsn=42, replay_lsn=30)),
        ("replica without read_only is still a reader", variables("0", "0-1-42", "0-1-42", "0-1-42"), slave(),
         ProbeResult(in_recovery=True, receive_lsn=42, replay_lsn=42)),
        ("replica, IO position not known yet", variables("1", "", "", ""), slave(io="Connecting", io_pos=""),
         ProbeResult(in_recovery=True, receive_lsn=None, replay_lsn=0)),
        ("multi-domain replica", variables("1", "0-1-10,1-2-5", "0-1-10,1-2-5", "0-1-10,1-2-5"),
         slave(behind="3", io_pos="0-1-12"),
         # domain 1 arrives through no IO position: it counts as applied, never as behind.
         ProbeResult(in_recovery=True, receive_lsn=17, replay_lsn=15, replay_age_s=3.0)),
        ("read-only, not a replica", variables("1", "0-1-42", "", "0-1-42"), None,
         ProbeResult(in_recovery=True, replay_lsn=42)),
    ],
)
def test_parse_probe(name: str, vars_: dict[str, str | None], status: dict[str, str | None] | None,
                     expected: ProbeResult) -> None:
    assert parse_probe(vars_, status) == expected, name


@pytest.mark.parametrize(
    ("vars_", "status"),
    [
        (variables(read_only="maybe"), None),
        ({**variables(), "read_only": None}, None),
        ({"gtid_binlog_pos": "0-1-1"}, None),
        (variables(binlog="garbage"), None),
        (variables("1", slave="0-1"), slave()),
        (variables("1", slave="0-1-42"), slave(io_pos="0-1-x")),
        (variables("1", slave="0-1-42"), slave(behind="soon")),
        (variables("1", slave="0-1-42"), slave(behind="-1")),
    ],
)
def test_parse_probe_garbage(vars_: dict[str, str | None], status: dict[str, str | None] | None) -> None:
    with pytest.raises(ValueError):
        parse_probe(vars_, status)


def test_topology_lag_from_gtid_positions() -> None:
    """Fed to the topology unchanged: an idle writer shows no lag, a replica behind shows some."""
    topo = ClusterTopology(("my0", "my1", "my2"), max_replica_lag_ms=1000)
    topo.probe_succeeded("my0", 0.0, result=parse_probe(variables(binlog="0-1-42"), None))
    topo.probe_succeeded("my1", 0.0, result=parse_probe(variables("1", "0-1-42", "0-1-42", "0-1-42"), slave()))
    topo.probe_succeeded("my2", 0.0, result=parse_probe(variables("1", "0-1-40", "0-1-40", "0-1-40"),
                                                       slave(sql="No", behind=None, io_pos="0-1-42")))
    assert topo.writer == "my0"
    assert topo.instances["my1"].lag_bytes == 0 and topo.instances["my1"].lag_ms == 0.0
    assert topo.instances["my2"].lag_bytes == 2
    topo.probe_succeeded("my0", 5.0, result=parse_probe(variables(binlog="0-1-43"), None))
    topo.probe_succeeded("my2", 5.0, result=parse_probe(variables("1", "0-1-40", "0-1-40", "0-1-40"),
                                                       slave(sql="No", behind=None, io_pos="0-1-43")))
    assert topo.instances["my2"].lag_bytes == 3
    assert topo.instances["my2"].lag_ms is not None and topo.instances["my2"].lag_ms > 0


def test_history_depth_is_the_timeline_of_a_writer() -> None:
    from endpoint_proxy.topology.mariadb_probe import gtid_history_depth

    assert gtid_history_depth("") == 0
    assert gtid_history_depth("0-1-42") == 1
    assert gtid_history_depth("0-1-42,0-2-50,1-2-7") == 2
    with pytest.raises(ValueError):
        gtid_history_depth("0-x-1")
    old = parse_probe({"read_only": "0", "gtid_binlog_pos": "0-1-40", "gtid_slave_pos": "",
                       "gtid_current_pos": "0-1-40", "gtid_binlog_state": "0-1-40"}, None)
    new = parse_probe({"read_only": "0", "gtid_binlog_pos": "0-2-41", "gtid_slave_pos": "0-1-39",
                       "gtid_current_pos": "0-2-41", "gtid_binlog_state": "0-1-39,0-2-41"}, None)
    assert (old.timeline, new.timeline) == (1, 2)
