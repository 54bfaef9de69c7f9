"""What a MariaDB monitor probe saw, as a ProbeResult: role from read_only and replication, GTIDs as positions.

Rules of this file: pure functions, no I/O. Garbage raises ValueError.

A GTID position becomes one comparable integer: the sum of the sequence numbers of every
replication domain of a GTID list ("0-1-42,1-2-7" -> 49). It grows with every transaction
as long as each domain's seq_no only grows, which MariaDB guarantees within a domain
(with gtid_strict_mode, as the local cluster runs) and as long as no domain is removed from
the lists (``FLUSH BINARY LOGS DELETE_DOMAIN_ID``). Comparing the writer's binlog position
with a replica's applied position then gives the number of transactions the replica has
still to apply, and zero when it has them all, so the topology's lag logic (written for
PostgreSQL's WAL byte positions) works unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .state import ProbeResult

_MAX_DOMAIN: Final = 0xFFFFFFFF
_MAX_SERVER_ID: Final = 0xFFFFFFFF
_MAX_SEQ: Final = 0xFFFFFFFFFFFFFFFF

# @@read_only: 0/1 in MariaDB 10.x, OFF/ON/NO_LOCK/NO_LOCK_NO_ADMIN where it is an enum (11.x).
_READ_ONLY_VALUES: Final = {
    "0": False, "off": False,
    "1": True, "on": True, "no_lock": True, "no_lock_no_admin": True,
}
# Replication thread states that mean "configured and meant to run" (Connecting: the primary is away).
_RUNNING: Final = frozenset({"yes", "connecting", "preparing"})


def parse_gtid_list(text: str) -> dict[int, int]:
    """A GTID list ("domain-server-seq,..."; empty for none) as {domain: seq_no}; ValueError on garbage."""
    positions: dict[int, int] = {}
    text = text.strip()
    if not text:
        return positions
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"not a GTID: {item.strip()!r} in {text!r}")
        domain, server_id, seq = (int(p) for p in parts)
        if domain > _MAX_DOMAIN or server_id > _MAX_SERVER_ID or seq > _MAX_SEQ:
            raise ValueError(f"GTID out of range: {item.strip()!r}")
        if domain in positions:
            raise ValueError(f"domain {domain} appears twice in the GTID list {text!r}")
        positions[domain] = seq
    return positions


def gtid_position(text: str) -> int:
    """The sum of the seq_no of every domain of a GTID list (see the module docstring); 0 for an empty list."""
    return sum(parse_gtid_list(text).values())


def parse_read_only(value: str | None) -> bool:
    if value is None or value.strip().lower() not in _READ_ONLY_VALUES:
        raise ValueError(f"@@read_only is {value!r}")
    return _READ_ONLY_VALUES[value.strip().lower()]


def _text(values: Mapping[str, str | None], key: str) -> str:
    value = values.get(key)
    return value if value is not None else ""


def _replicating(slave_status: Mapping[str, str | None]) -> bool:
    io = _text(slave_status, "Slave_IO_Running").strip().lower()
    sql = _text(slave_status, "Slave_SQL_Running").strip().lower()
    return io in _RUNNING or sql in _RUNNING


def _seconds(value: str | None) -> float:
    if value is None or not value.strip():
        return 0.0  # NULL: the SQL thread is not running; lag then comes from the positions
    seconds = float(value)
    if not seconds >= 0:
        raise ValueError(f"Seconds_Behind_Master is {value!r}")
    return seconds


def gtid_history_depth(state: str) -> int:
    """How many servers have written the history a binlog holds: the distinct server ids in
    ``@@gtid_binlog_state`` (one entry per domain and server). A promoted replica holds its old
    primary's GTIDs and, once it writes, its own; an old primary brought back holds only its
    own. So the deeper history is the newer writer: the MariaDB counterpart of PostgreSQL's
    timeline, used to fence the other."""
    servers = set()
    for entry in state.replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a GTID: {entry!r}")
        servers.add(int(parts[1]))
    return len(servers)


def parse_probe(variables: Mapping[str, str | None],
                slave_status: Mapping[str, str | None] | None) -> ProbeResult:
    """The probe's answer as a ProbeResult.

    ``variables``: read_only, gtid_binlog_pos, gtid_slave_pos, gtid_current_pos (text values
    of the global variables). ``slave_status``: the row of ``SHOW SLAVE STATUS`` by column
    name, None (or empty) when the server is not configured as a replica.

    A reader (in recovery): read_only is on, or replication threads are running (a replica
    that forgot read_only still is no writer). A writer: read_only off and not replicating;
    its ``current_lsn`` is its binlog position. A reader's ``replay_lsn`` is what it applied
    (gtid_slave_pos when it is configured as a replica, else gtid_current_pos) and
    ``receive_lsn`` what its IO thread fetched (Gtid_IO_Pos, per domain never behind what
    was applied), None when unknown; ``replay_age_s`` is Seconds_Behind_Master.
    """
    status = slave_status or None
    read_only = parse_read_only(variables.get("read_only"))
    binlog_pos = parse_gtid_list(_text(variables, "gtid_binlog_pos"))
    slave_pos = parse_gtid_list(_text(variables, "gtid_slave_pos"))
    current_pos = parse_gtid_list(_text(variables, "gtid_current_pos"))
    replicating = status is not None and _replicating(status)
    if not read_only and not replicating:
        state = variables.get("gtid_binlog_state")
        timeline = gtid_history_depth(state) if state is not None else None
        return ProbeResult(in_recovery=False, current_lsn=sum(binlog_pos.values()), timeline=timeline)
    if status is None:
        # Read-only but not a replica: nothing arrives; what it has is what it applied.
        replayed = current_pos
        return ProbeResult(in_recovery=True, receive_lsn=None, replay_lsn=sum(replayed.values()))
    io_text = _text(status, "Gtid_IO_Pos")
    receive_lsn: int | None = None
    if io_text.strip():
        io_pos = parse_gtid_list(io_text)
        receive_lsn = sum(max(io_pos.get(d, 0), slave_pos.get(d, 0)) for d in io_pos.keys() | slave_pos.keys())
    return ProbeResult(
        in_recovery=True,
        receive_lsn=receive_lsn,
        replay_lsn=sum(slave_pos.values()),
        replay_age_s=_seconds(status.get("Seconds_Behind_Master")),
    )
