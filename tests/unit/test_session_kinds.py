"""The one list of session state per protocol: README's table, the classifiers and the trackers agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from endpoint_proxy.routing import my_classify, pg_classify
from endpoint_proxy.routing.session_kinds import (
    MY_PINNING_STATES,
    MY_STATE_KINDS,
    PG_PINNING_STATES,
    PG_STATE_KINDS,
    Action,
    label_of,
    pooled_how,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_rows() -> list[tuple[str, ...]]:
    text = README.read_text()
    section = text.split("\n## Session state\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| protocol | state | set up by | the proxy | transaction pooling |"
    return [tuple(cell.strip() for cell in line[2:-2].split(" | ")) for line in lines[2:]]


def _list_rows() -> list[tuple[str, ...]]:
    return [(protocol, k.label, k.set_up_by, f"{k.action}: {k.how}", pooled_how(protocol.lower(), k))
            for protocol, kinds in (("PostgreSQL", PG_STATE_KINDS), ("MySQL", MY_STATE_KINDS)) for k in kinds]


def test_the_readme_table_is_the_list() -> None:
    assert _readme_rows() == _list_rows()


def test_rows_are_well_formed() -> None:
    for kinds in (PG_STATE_KINDS, MY_STATE_KINDS):
        keys = [k.key for k in kinds]
        assert len(keys) == len(set(keys))
        assert len({k.label for k in kinds}) == len(kinds)
        for k in kinds:
            assert "|" not in k.label + k.set_up_by + k.how  # a table cell
            assert isinstance(k.action, Action)
    assert PG_PINNING_STATES == {k.key for k in PG_STATE_KINDS if k.action is Action.PINNED}
    assert MY_PINNING_STATES == {k.key for k in MY_STATE_KINDS if k.action is Action.PINNED}
    assert label_of("postgresql", "listen") == "LISTEN"
    assert label_of("mysql", "handler") == "HANDLER"
    assert label_of("mysql", "nonsense") == "nonsense"


def test_the_classifiers_pin_what_the_list_pins() -> None:
    assert pg_classify.PINNING_STATES == PG_PINNING_STATES
    assert my_classify.PINNING_STATES == MY_PINNING_STATES
    # the defect the list fixes: HANDLER pins like the other MySQL locks and cursors
    assert {"handler", "named_lock", "lock_tables", "temp_table"} <= MY_PINNING_STATES
    assert {"listen", "temp_table", "advisory_lock", "cursor_with_hold", "set_config_computed"} <= PG_PINNING_STATES


def _emitted(source: Path) -> set[str]:
    """Every session_state literal a classifier's source hands out."""
    text = source.read_text()
    found = set(re.findall(r'session_state="([a-z_]+)"', text))
    found |= set(re.findall(r'states\.append\("([a-z_]+)"\)', text))
    found |= set(re.findall(r'_state_verb\("([a-z_]+)"\)', text))
    found |= set(re.findall(r'"([a-z_]+)" if temp else', text))
    return found


@pytest.mark.parametrize(("module", "kinds"), [(pg_classify, PG_STATE_KINDS), (my_classify, MY_STATE_KINDS)])
def test_every_state_a_classifier_reports_is_in_its_list(module: object, kinds: tuple[object, ...]) -> None:
    keys = {k.key for k in kinds}  # type: ignore[attr-defined]
    emitted = _emitted(Path(module.__file__))  # type: ignore[attr-defined]
    assert emitted, "the patterns above no longer find the states"
    assert emitted <= keys, emitted - keys
    extra = {"advisory_lock", "setseed", "dblink_connection", "replication_origin"} if module is pg_classify else set()
    assert extra <= keys


def test_reported_states_of_real_statements_are_in_the_lists() -> None:
    pg = ["SET a = 1", "RESET a", "DISCARD ALL", "LISTEN c", "UNLISTEN c", "LOAD 'x'", "PREPARE p AS SELECT 1",
          "DEALLOCATE p", "CREATE TEMP TABLE t (a int)", "SELECT pg_advisory_lock(1)", "SELECT setseed(0.5)",
          "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "SELECT set_config('a', 'b', false)",
          "SELECT set_config('a', $1, false)", "DO $$BEGIN SET search_path = x; END$$",
          "UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'", "SELECT dblink_connect('c', 'x')",
          "SELECT pg_replication_origin_session_setup('o')"]
    keys = {k.key for k in PG_STATE_KINDS}
    for sql in pg:
        state = pg_classify.classify(sql, standard_conforming_strings=True).session_state
        assert state in keys, (sql, state)
    my = ["SET a = 1", "SET @a = 1", "SET autocommit = 0", "SET autocommit = 1", "USE d", "PREPARE s FROM 'SELECT 1'",
          "DEALLOCATE PREPARE s", "CREATE TEMPORARY TABLE t (a int)", "SELECT GET_LOCK('a', 1)", "LOCK TABLES t READ",
          "UNLOCK TABLES", "HANDLER t OPEN", "SELECT @a"]
    keys = {k.key for k in MY_STATE_KINDS}
    for sql in my:
        state = my_classify.classify(sql, no_backslash_escapes=False, ansi_quotes=False).session_state
        assert state in keys, (sql, state)
