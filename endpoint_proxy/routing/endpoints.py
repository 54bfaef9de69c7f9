"""Connection-level routing for the endpoint kinds: writer, reader, custom, instance."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ..config import EndpointConfig
from ..topology.state import ClusterTopology


@dataclass(frozen=True)
class Route:
    """Where a connection goes; instance None means nothing is eligible, with the reason."""

    instance: str | None
    reason: str = ""
    needs_writer: bool = False  # the route is "the writer": wait for one when none is known


_TO: dict[str, Route] = {}


def members(endpoint: EndpointConfig, topology: ClusterTopology) -> list[str]:
    """The instances an endpoint may use right now (up, right role), in configuration order."""
    kind = endpoint.kind
    if kind in ("writer", "readwrite"):
        w = topology.writer
        return [w] if w is not None else []
    if kind == "reader":
        return topology.readers()
    if kind == "instance":
        name = endpoint.instance
        assert name is not None
        st = topology.instances.get(name)  # None: a Patroni member not (yet, or any more) known
        return [name] if st is not None and st.up and not st.fenced else []
    # custom
    candidates = [n for n in topology.instance_names
                  if (endpoint.members is None or n in endpoint.members)
                  and (endpoint.excluded is None or n not in endpoint.excluded)]
    if endpoint.role == "reader":
        readers = set(topology.readers())
        return [n for n in candidates if n in readers]
    return [n for n in candidates
            if topology.is_up(n) and not topology.instances[n].fenced
            and (n == topology.writer or topology.instances[n].in_recovery)]


def least_loaded(candidates: list[str], load: Mapping[str, float],
                 weights: Mapping[str, int] | None = None, lag: Mapping[str, float] | None = None) -> str:
    """Least load per unit of weight; ties go to the lower lag, then to the earlier instance."""
    def key(name: str) -> tuple[float, float]:
        w = weights.get(name, 1) if weights else 1
        share = load.get(name, 0) / w if w > 0 else float("inf")
        return share, (lag.get(name, 0.0) if lag else 0.0)

    return min(candidates, key=key)


def route(endpoint: EndpointConfig, topology: ClusterTopology, load: Mapping[str, float], *,
          fallback_to_writer: bool, weights: Mapping[str, int] | None = None, rotation: int = 0,
          exclude: AbstractSet[str] = frozenset()) -> Route:
    """``rotation`` turns the candidate list so that ties in load take turns. ``exclude``:
    instances the caller could not reach; they are passed over (also as the fallback
    writer) without anything being marked, and a route that needs one of them has none."""
    kind = endpoint.kind
    if kind in ("writer", "readwrite"):
        w = topology.writer
        if w is None:
            return Route(None, "no writer is known", needs_writer=True)
        if w in exclude:
            return Route(None, f"the writer {w} could not be reached", needs_writer=True)
        route_ = _TO.get(w)
        if route_ is None:
            route_ = _TO[w] = Route(w)  # (routes are immutable: one per instance name, asked for per borrow)
        return route_
    eligible = [n for n in members(endpoint, topology) if n not in exclude]
    if eligible:
        if weights:
            positive = [n for n in eligible if weights.get(n, 1) > 0]
            eligible = positive or eligible
        if rotation and len(eligible) > 1:
            k = rotation % len(eligible)
            eligible = eligible[k:] + eligible[:k]
        lag = {n: topology.instances[n].lag_ms or 0.0 for n in eligible}
        return Route(least_loaded(eligible, load, weights, lag))
    if kind == "instance":
        return Route(None, f"instance {endpoint.instance} is not available")
    if fallback_to_writer and (kind == "reader" or endpoint.role == "reader"):
        w = topology.writer
        if w is not None and w not in exclude and _writer_allowed(endpoint, w):
            return Route(w, "no eligible replica: fell back to the writer")
        return Route(None, "no eligible replica and no writer is known", needs_writer=True)
    return Route(None, f"no instance of endpoint {endpoint.name} is available")


def _writer_allowed(endpoint: EndpointConfig, writer: str) -> bool:
    if endpoint.kind != "custom":
        return True
    if endpoint.excluded is not None and writer in endpoint.excluded:
        return False
    return endpoint.members is None or writer in endpoint.members
