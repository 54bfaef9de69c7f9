"""The PostgreSQL probe's pure half: what it asks, its answer as a ProbeResult, the volatile-function catalog.

Rules of this file: pure functions, no I/O. A row that does not parse raises ValueError
naming the column, so a broken or hostile server is a failed probe with a clear reason.
"""

from __future__ import annotations

from typing import Final

from .state import ProbeResult

# What the monitor asks each instance: role, WAL positions as byte counts, the age of the
# last replayed transaction, and (on a writable instance) its timeline.
PG_PROBE_SQL: Final = """
select pg_is_in_recovery(),
       case when pg_is_in_recovery() then null else pg_current_wal_lsn() - '0/0' end,
       pg_last_wal_receive_lsn() - '0/0',
       pg_last_wal_replay_lsn() - '0/0',
       coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0),
       case when pg_is_in_recovery() then null
            else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end
"""

PROBE_COLUMNS: Final = ("in_recovery", "current_lsn", "receive_lsn", "replay_lsn", "replay_age_s", "timeline")

# User functions that may write: volatile ones outside the system schemas, as one text value
# (names separated by U+001F, which no sane identifier holds).
VOLATILE_FUNCTIONS_SQL: Final = r"""
select coalesce(string_agg(distinct lower(p.proname), E'\x1f'), '')
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where p.provolatile = 'v' and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname not like 'pg\_toast%'
"""

_BOOLEANS: Final = {"t": True, "f": False}


def _boolean(value: str | None, column: str) -> bool:
    if value not in _BOOLEANS:
        raise ValueError(f"probe column {column} is {value!r}, not t or f")
    return _BOOLEANS[value]


def _position(value: str | None, column: str) -> int | None:
    """A WAL position or timeline: a non-negative whole number, or NULL."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"probe column {column} is {value!r}, not a number") from None
    if not (0 <= number < 2**64) or number != int(number):
        raise ValueError(f"probe column {column} is {value!r}, not a position")
    return int(number)


def _seconds(value: str | None, column: str) -> float:
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"probe column {column} is {value!r}, not a number") from None
    if not seconds == seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"probe column {column} is {value!r}")
    # A replica's clock slightly behind the primary's gives a small negative age.
    return max(0.0, seconds)


def parse_probe_row(rows: list[tuple[str | None, ...]]) -> ProbeResult:
    """The answer to PG_PROBE_SQL (its rows, text values) as a ProbeResult; ValueError on anything else."""
    if len(rows) != 1:
        raise ValueError(f"the probe returned {len(rows)} rows, not 1")
    row = rows[0]
    if len(row) != len(PROBE_COLUMNS):
        raise ValueError(f"the probe returned {len(row)} columns, not {len(PROBE_COLUMNS)}")
    in_recovery = _boolean(row[0], "in_recovery")
    current, receive, replay = (_position(row[i], PROBE_COLUMNS[i]) for i in (1, 2, 3))
    timeline = _position(row[5], "timeline")
    if not in_recovery and timeline is None:
        raise ValueError("a writable instance reported no timeline")
    return ProbeResult(
        in_recovery=in_recovery,
        current_lsn=current,
        receive_lsn=receive,
        replay_lsn=replay,
        replay_age_s=_seconds(row[4], "replay_age_s"),
        timeline=timeline,
    )


def parse_function_names(rows: list[tuple[str | None, ...]]) -> frozenset[str]:
    """The answer to VOLATILE_FUNCTIONS_SQL as a set of lower-case names; ValueError on anything else."""
    if len(rows) != 1 or len(rows[0]) != 1:
        raise ValueError("the function catalog query returned an unexpected shape")
    return frozenset(n for n in (rows[0][0] or "").split("\x1f") if n)
