"""Patroni as the HA authority, without servers: the election under the leader key (tables),
what the store's JSON means (etcd v3 gateway, Patroni's REST), the configuration, the runtime
following the store, and cancel keys that name their proxy."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest

from endpoint_proxy.config import ConfigError, parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.session.context import CancelRegistry, CancelTarget
from endpoint_proxy.topology.patroni import (
    PatroniDataError,
    PatroniView,
    parse_member,
    parse_range,
    parse_rest_cluster,
    parse_watch_message,
    prefix_end,
)
from endpoint_proxy.topology.state import AuthorityConstraint, ClusterTopology, ProbeResult, Role

# --- the election under an authority -------------------------------------------------------------

WRITABLE = ProbeResult(False, timeline=1)
WRITABLE_T2 = ProbeResult(False, timeline=2)
REPLICA = ProbeResult(True)

# Each step: what happens (a probe result for an instance, or the authority's leader), then
# the writer and the roles that must hold after it.
Step = tuple[str, Any, str | None, dict[str, Role]]
LEADER = "leader"

SCENARIOS: dict[str, list[Step]] = {
    "the named leader is the writer only once a probe shows it writable": [
        ("a", WRITABLE, None, {"a": Role.FENCED}),  # no leader named yet: nobody
        (LEADER, "a", "a", {"a": Role.WRITER}),
        ("b", REPLICA, "a", {"b": Role.READER}),
        (LEADER, "b", None, {"a": Role.FENCED, "b": Role.READER}),  # the key moved before the server
        ("b", WRITABLE_T2, "b", {"b": Role.WRITER, "a": Role.FENCED}),
    ],
    "a writable member the key does not name never gets writes (Patroni killed alone)": [
        (LEADER, "a", None, {}),
        ("a", WRITABLE, "a", {"a": Role.WRITER}),
        (LEADER, None, None, {"a": Role.FENCED}),  # the leader key is deleted: hold
        ("b", WRITABLE_T2, None, {"b": Role.FENCED}),  # promoted, but not named yet
        (LEADER, "b", "b", {"a": Role.FENCED, "b": Role.WRITER}),
    ],
    "the key, not the timeline, decides (a cluster rebuilt from timeline 1)": [
        (LEADER, "a", None, {}),
        ("a", ProbeResult(False, timeline=7), "a", {}),
        ("a", REPLICA, None, {"a": Role.READER}),
        (LEADER, "b", None, {}),
        ("b", WRITABLE, "b", {"b": Role.WRITER}),
    ],
    "a named leader that goes down leaves no writer (no election of the proxy's own)": [
        (LEADER, "a", None, {}),
        ("a", WRITABLE, "a", {}),
        ("b", WRITABLE, "a", {"b": Role.FENCED}),
        ("a", "down", None, {"b": Role.FENCED}),
    ],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_election_under_the_leader_key(name: str) -> None:
    topo = ClusterTopology(("a", "b"))
    topo.set_authority(AuthorityConstraint(None, "patroni"))
    for t, (what, value, writer, roles) in enumerate(SCENARIOS[name]):
        generation = topo.generation
        if what == LEADER:
            topo.set_authority(AuthorityConstraint(value, "patroni"))
        elif value == "down":
            topo.probe_failed(what, float(t), "connection refused")
        else:
            topo.probe_succeeded(what, float(t), result=value)
        assert topo.writer == writer, f"step {t}"
        for inst, role in roles.items():
            assert topo.role(inst) is role, f"step {t}: {inst}"
        if what == LEADER and topo.writer != writer:
            assert topo.generation > generation


def test_without_the_authority_the_proxy_elects_again() -> None:
    topo = ClusterTopology(("a",))
    topo.set_authority(AuthorityConstraint(None, "patroni"))
    topo.probe_succeeded("a", 0.0, result=WRITABLE)
    assert topo.writer is None
    topo.set_authority(None)
    assert topo.writer == "a"


def test_noloadbalance_members_leave_reader_endpoints() -> None:
    topo = ClusterTopology(("a", "b", "c"))
    for name in ("b", "c"):
        topo.probe_succeeded(name, 0.0, result=REPLICA)
    assert topo.readers() == ["b", "c"]
    generation = topo.generation
    topo.set_no_readers(frozenset({"c"}))
    assert topo.readers() == ["b"] and topo.generation > generation


# --- the store's JSON -------------------------------------------------------------------------------

PREFIX = "/service/ep/"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def member_json(port: int, role: str = "replica", **extra: Any) -> str:
    return json.dumps({"conn_url": f"postgres://127.0.0.1:{port}/postgres",
                       "api_url": f"http://127.0.0.1:{port + 1}/patroni", "role": role, "state": "running",
                       "xlog_location": extra.pop("xlog", 100), **extra})


def kv(key: str, value: str, create: int, mod: int) -> dict[str, Any]:
    return {"key": b64(PREFIX + key), "value": b64(value), "create_revision": str(create), "mod_revision": str(mod)}


def test_a_member_parses_and_bad_ones_say_why() -> None:
    m = parse_member("pg1", member_json(5433, tags={"noloadbalance": True, "nofailover": "true"}, timeline=3))
    assert (m.host, m.port, m.role, m.timeline, m.noloadbalance, m.nofailover) == (
        "127.0.0.1", 5433, "replica", 3, True, True)
    for bad in ("not json", "[]", json.dumps({"role": "replica"}), json.dumps({"conn_url": "postgres://:x/"})):
        with pytest.raises(PatroniDataError):
            parse_member("pg1", bad)


def test_prefix_end_covers_the_prefix() -> None:
    assert base64.b64decode(prefix_end("/service/ep/")) == b"/service/ep0"


def test_a_snapshot_then_watch_events() -> None:
    view = PatroniView(PREFIX)
    answer = {"header": {"revision": "10"}, "kvs": [
        kv("leader", "pg0", 5, 9), kv("members/pg0", member_json(5432, "primary", xlog=500), 2, 8),
        kv("members/pg1", member_json(5433, xlog=400), 3, 7), kv("config", "{}", 1, 1)]}
    assert view.apply_snapshot(*parse_range(answer))
    assert (view.leader, view.revision, sorted(view.members)) == ("pg0", 5, ["pg0", "pg1"])
    assert view.lag_bytes("pg1") == 100
    # A refresh of the leader key keeps the fencing token (its create revision).
    refresh = json.dumps({"result": {"header": {"revision": "11"}, "events": [{"kv": kv("leader", "pg0", 5, 11)}]}})
    assert not view.apply_events(parse_watch_message(refresh))
    deleted = json.dumps({"result": {"header": {"revision": "12"}, "events": [
        {"type": "DELETE", "kv": {"key": b64(PREFIX + "leader"), "mod_revision": "12"}}]}})
    assert view.apply_events(parse_watch_message(deleted))
    assert (view.leader, view.revision) == (None, 12)
    taken = json.dumps({"result": {"header": {"revision": "13"}, "events": [{"kv": kv("leader", "pg1", 13, 13)}]}})
    assert view.apply_events(parse_watch_message(taken))
    assert (view.leader, view.revision) == ("pg1", 13)
    gone = json.dumps({"result": {"header": {"revision": "14"}, "events": [
        {"type": "DELETE", "kv": {"key": b64(PREFIX + "members/pg0")}}]}})
    view.apply_events(parse_watch_message(gone))
    assert sorted(view.members) == ["pg1"]


def test_the_heartbeat_repairs_a_missed_delete() -> None:
    view = PatroniView(PREFIX)
    view.apply_snapshot(*parse_range({"header": {"revision": "3"}, "kvs": [kv("leader", "pg0", 2, 3)]}))
    assert view.apply_leader(9, None)
    assert (view.leader, view.revision) == (None, 9)


@pytest.mark.parametrize("line", ["garbage", "[]", '{"result": {"events": [{"kv": {"key": "%%%"}}]}}',
                                  '{"error": {"message": "boom"}}', '{"result": {"events": 3}}'])
def test_bad_watch_messages_raise_our_error(line: str) -> None:
    with pytest.raises(PatroniDataError):
        parse_watch_message(line)


def test_a_canceled_watch_says_so() -> None:
    message = parse_watch_message(json.dumps({"result": {"header": {"revision": "5"}, "canceled": True,
                                                         "compact_revision": "4"}}))
    assert message.canceled is not None and "compacted" in message.canceled


def test_rest_cluster() -> None:
    leader, members = parse_rest_cluster({"members": [
        {"name": "pg0", "role": "leader", "host": "127.0.0.1", "port": 5432, "state": "running"},
        {"name": "pg1", "role": "replica", "host": "127.0.0.1", "port": 5433, "lag": 16,
         "tags": {"noloadbalance": True}},
    ]})
    assert leader == "pg0" and [m.name for m in members] == ["pg0", "pg1"]
    assert members[1].lag_bytes == 16 and members[1].noloadbalance
    with pytest.raises(PatroniDataError):
        parse_rest_cluster({"members": [{"name": "pg0"}]})


# --- configuration ------------------------------------------------------------------------------------

BASE: dict[str, Any] = {"clusters": [{
    "name": "ha", "protocol": "postgresql", "users": [{"name": "app", "password": "s"}],
    "patroni": {"scope": "ep", "etcd": ["http://127.0.0.1:2379"]},
    "endpoints": [{"name": "w", "listen": "127.0.0.1:6432", "kind": "writer"},
                  {"name": "i", "listen": "127.0.0.1:6433", "kind": "instance", "instance": "pg1"}],
}]}


def test_patroni_config_needs_no_instances() -> None:
    config = parse_config(copy.deepcopy(BASE))
    patroni = config.clusters[0].patroni
    assert patroni is not None and (patroni.prefix, patroni.rest) == ("/service/ep/", ())
    assert config.clusters[0].instances == ()


@pytest.mark.parametrize(("change", "key"), [
    ({"patroni": {"scope": "ep"}}, "clusters[0].patroni.etcd"),
    ({"patroni": {"etcd": ["http://127.0.0.1:2379"]}}, "clusters[0].patroni.scope"),
    ({"patroni": {"scope": "ep", "etcd": ["127.0.0.1:2379"]}}, "clusters[0].patroni.etcd[0]"),
    ({"patroni": {"scope": "ep", "rest": ["http://x:8008"], "namespace": "service"}}, "clusters[0].patroni.namespace"),
    ({"patroni": {"scope": "ep", "rest": ["http://x:8008"], "ttl": 3}}, "clusters[0].patroni.ttl"),
    ({"patroni": KeyError}, "clusters[0].instances"),
    ({"protocol": "mysql", "users": [{"name": "app", "password": "s"}]}, "clusters[0].patroni"),
])
def test_patroni_config_errors_name_their_key(change: dict[str, Any], key: str) -> None:
    doc = copy.deepcopy(BASE)
    for k, v in change.items():
        if v is KeyError:
            del doc["clusters"][0][k]
        else:
            doc["clusters"][0][k] = v
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == key


def test_promotion_patroni_needs_patroni() -> None:
    doc = copy.deepcopy(BASE)
    doc["clusters"][0]["promotion"] = {"method": "patroni"}
    assert parse_config(doc).clusters[0].promotion.method == "patroni"
    doc["clusters"][0]["instances"] = [{"name": "pg1", "host": "127.0.0.1", "port": 5432}]
    del doc["clusters"][0]["patroni"]
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == "clusters[0].promotion.method"


def test_peers() -> None:
    doc = copy.deepcopy(BASE)
    doc["peers"] = [{"id": 1, "address": "10.0.0.1:6432"}, {"id": 2, "address": "10.0.0.2:6432"}]
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == "server.peer_id"
    doc["server"] = {"peer_id": 1}
    assert [p.id for p in parse_config(doc).peers] == [1, 2]
    doc["peers"][1]["id"] = 1
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert e.value.path == "peers[1].id"


# --- the runtime follows the store -------------------------------------------------------------------


async def test_the_runtime_takes_members_and_the_leader_from_the_store() -> None:
    runtime = ClusterRuntime(parse_config(copy.deepcopy(BASE)).clusters[0])
    authority = runtime.patroni
    assert authority is not None and runtime.topology.authority == AuthorityConstraint(None, "patroni")
    view = authority.view
    view.apply_snapshot(*parse_range({"header": {"revision": "4"}, "kvs": [
        kv("leader", "pg0", 4, 4), kv("members/pg0", member_json(5432, "primary"), 2, 2),
        kv("members/pg1", member_json(5433, tags={"noloadbalance": True}), 3, 3)]}))
    authority.known = True
    runtime._authority_changed()
    assert [(i.name, i.port) for i in runtime.config.instances] == [("pg0", 5432), ("pg1", 5433)]
    assert runtime.topology.no_readers == frozenset({"pg1"})
    runtime.topology.probe_succeeded("pg0", 0.0, result=WRITABLE)
    assert runtime.topology.writer == "pg0"
    view.apply_leader(5, None)  # the leader key is deleted: statements hold from now on
    runtime._authority_changed()
    assert runtime.topology.writer is None


# --- cancel keys --------------------------------------------------------------------------------------

TARGET = CancelTarget(address=parse_config(copy.deepcopy(BASE)).clusters[0].endpoints[0].listen,
                      process_id=1, secret_key=2)


def test_cancel_keys_name_their_proxy_and_worker() -> None:
    registry = CancelRegistry(3, worker_bits=2, peer_id=7)
    secret = registry.issue(42, TARGET)
    assert registry.peer_of(secret) == 7 and registry.owner_of(secret) == 3
    assert registry.lookup(42, secret) == TARGET


def test_without_peers_or_workers_the_whole_key_is_random() -> None:
    registry = CancelRegistry(0, worker_bits=0)
    secrets = {registry.issue(n, TARGET) for n in range(200)}
    assert registry.peer_of(next(iter(secrets))) is None
    assert any(s & 0xFF for s in secrets) and any(s >> 31 for s in secrets)


async def test_a_reload_keeps_patronis_members_and_can_drop_the_authority() -> None:
    config = parse_config(copy.deepcopy(BASE)).clusters[0]
    runtime = ClusterRuntime(config)
    authority = runtime.patroni
    assert authority is not None
    authority.view.apply_snapshot(*parse_range({"header": {"revision": "4"}, "kvs": [
        kv("leader", "pg0", 4, 4), kv("members/pg0", member_json(5432, "primary"), 2, 2)]}))
    authority.known = True
    runtime._authority_changed()
    runtime.apply_config(config)  # the same file again: the members stay
    assert [i.name for i in runtime.config.instances] == ["pg0"]
    doc = copy.deepcopy(BASE)
    del doc["clusters"][0]["patroni"]
    doc["clusters"][0]["instances"] = [{"name": "pg0", "host": "127.0.0.1", "port": 5432}]
    doc["clusters"][0]["endpoints"] = doc["clusters"][0]["endpoints"][:1]
    changes = runtime.apply_config(parse_config(doc).clusters[0])
    assert runtime.patroni is None and runtime.topology.authority is None
    assert any("[clusters.patroni] removed" in c for c in changes)
    runtime.topology.probe_succeeded("pg0", 0.0, result=WRITABLE)
    assert runtime.topology.writer == "pg0"
