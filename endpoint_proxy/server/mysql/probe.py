"""The MariaDB monitor probe: one round trip for role, GTID positions and replication status."""

from __future__ import annotations

from typing import Final

from ...topology.mariadb_probe import parse_probe
from ...topology.state import ProbeResult
from .backend import MyBackendError, MyProbeConnection

# Two statements in one COM_QUERY (probe connections agree CLIENT_MULTI_STATEMENTS): the
# global variables, then the default replication connection's status (no row when the
# server is not a replica). The monitor user needs SLAVE MONITOR (REPLICATION CLIENT
# before 10.5) for the second.
MARIADB_PROBE_SQL: Final = (
    "SELECT @@global.read_only AS read_only, @@global.gtid_binlog_pos AS gtid_binlog_pos, "
    "@@global.gtid_slave_pos AS gtid_slave_pos, @@global.gtid_current_pos AS gtid_current_pos, "
    "@@global.gtid_binlog_state AS gtid_binlog_state; "
    "SHOW SLAVE STATUS"
)


async def probe_mariadb(conn: MyProbeConnection) -> ProbeResult:
    """Run the probe on an open monitor connection.

    Raises MyBackendError (the server refused, or answered with the wrong shape), ValueError
    (a value that does not parse), or OSError (network).
    """
    results = await conn.query_results(MARIADB_PROBE_SQL)
    if len(results) != 2 or len(results[0].rows) != 1 or len(results[1].rows) > 1:
        shape = [len(r.rows) for r in results]
        raise MyBackendError(f"unexpected answer to the MariaDB probe: rows per result set {shape}")
    variables = dict(zip(results[0].columns, results[0].rows[0], strict=True))
    slave_status = dict(zip(results[1].columns, results[1].rows[0], strict=True)) if results[1].rows else None
    return parse_probe(variables, slave_status)
