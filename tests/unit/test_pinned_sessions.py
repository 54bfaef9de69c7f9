"""Pinned sessions: the gauge counts each session once, under the reason it is pinned for, until the
pin is released or the session ends; SHOW SESSIONS says why a session is pinned."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from endpoint_proxy.app import ProxyConsole
from endpoint_proxy.config import parse_config
from endpoint_proxy.server.cluster import ClusterRuntime
from endpoint_proxy.server.metrics import ProxyMetrics
from endpoint_proxy.server.session.env import SessionEnv
from endpoint_proxy.server.session.info import SessionInfo

CONFIG = parse_config({"clusters": [{
    "name": "app", "protocol": "postgresql",
    "instances": [{"name": "a", "host": "127.0.0.1", "port": 1}],
    "endpoints": [{"name": "rw", "listen": "127.0.0.1:0", "kind": "readwrite"}],
}]})


def setup() -> tuple[ProxyMetrics, ClusterRuntime]:
    metrics = ProxyMetrics()
    return metrics, ClusterRuntime(CONFIG.clusters[0], metrics.cluster("app"))


def env_of(rt: ClusterRuntime) -> SessionEnv:
    ep = CONFIG.clusters[0].endpoints[0]
    return SessionEnv(rt, ep, rt.metrics.endpoint(ep.name))


def pinned(metrics: ProxyMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("endpoint_proxy_pinned_sessions",
                                             {"cluster": "app", "endpoint": "rw", "reason": reason})


def test_the_gauge_is_per_reason_and_follows_pin_and_release() -> None:
    metrics, rt = setup()
    listen, temp = env_of(rt), env_of(rt)
    listen.pinned("LISTEN")
    listen.pinned("LISTEN")  # reported again: still one session
    temp.pinned("temporary table")
    assert (pinned(metrics, "LISTEN"), pinned(metrics, "temporary table")) == (1, 1)
    listen.unpinned("LISTEN")  # UNLISTEN *
    assert pinned(metrics, "LISTEN") == 0 and listen.pin is None
    listen.unpinned("LISTEN")  # twice: nothing more to release
    assert pinned(metrics, "LISTEN") == 0
    temp.closed()  # the session ended while pinned
    assert pinned(metrics, "temporary table") == 0
    temp.closed()
    assert pinned(metrics, "temporary table") == 0


def test_a_new_reason_moves_the_count() -> None:
    metrics, rt = setup()
    env = env_of(rt)
    env.pinned("LISTEN")
    env.pinned("session advisory lock")
    assert (pinned(metrics, "LISTEN"), pinned(metrics, "session advisory lock")) == (0, 1)


class FakeSession:
    def __init__(self, env: SessionEnv, info: SessionInfo | None) -> None:
        self.env = env
        self.info = info

    def session_info(self) -> SessionInfo | None:
        return self.info


def test_show_sessions_says_why_a_session_is_pinned() -> None:
    _, rt = setup()
    env, other = env_of(rt), env_of(rt)
    env.pinned("LISTEN")
    sessions: set[Any] = {
        FakeSession(env, SessionInfo("app", "rw", 1, "app", "app", "a", "idle")),
        FakeSession(other, SessionInfo("app", "rw", 2, "app", "app", "a", "idle")),
        FakeSession(env_of(rt), None),  # a console session: not listed
        FakeSession(other, SessionInfo("app", "rw", 3, "app", "app", "a", "idle", pinned="WITH HOLD cursor")),
    }
    console = ProxyConsole(SimpleNamespace(config=CONFIG, sessions=sessions))  # type: ignore[arg-type]
    assert sorted((i.id, i.pinned) for i in console.sessions()) == [(1, "LISTEN"), (2, None),
                                                                   (3, "WITH HOLD cursor")]
