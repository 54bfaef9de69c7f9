"""Injected faults (SIMULATE ...) as a session's server connections meet them.

Rules of this file: the drills module decides what is active (``cluster.drills``); this only
applies it at the three places a session touches a server: before connecting (a failed
instance refuses; a share of reader routings fail as against a dead replica), once connected
(the instance's toxics wrap the connection), and when a fault starts while connected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import EndpointConfig
from ...relay.toxics import ToxicConn
from .backends import Backend

if TYPE_CHECKING:
    from ..cluster import ClusterRuntime


def reads_from_replicas(rule: EndpointConfig) -> bool:
    return rule.kind == "reader" or (rule.kind == "custom" and rule.role == "reader")


def refused(cluster: ClusterRuntime, rule: EndpointConfig, instance: str) -> bool:
    """Before connecting to ``instance``: True when a READ REPLICA FAILURE drops this routing
    (try another instance, as after a dead replica; the monitor is not bothered). Raises
    SimulatedFailure, a ConnectionRefusedError, while the instance is under INSTANCE FAILURE."""
    drills = cluster.drills
    if drills.faults.empty:
        return False  # (the usual case, asked before every borrow)
    drills.check_connect(instance)
    return reads_from_replicas(rule) and drills.reader_routing_fails(instance)


def with_toxics(cluster: ClusterRuntime, backend: Backend) -> None:
    """Once connected: the instance's active toxics apply to this connection."""
    if cluster.drills.toxics(backend.instance) is not None and not isinstance(backend.conn, ToxicConn):
        backend.conn = cluster.drills.wrap(backend.conn, backend.instance)


def take_fault(cluster: ClusterRuntime, backend: Backend) -> None:
    """A fault started on the instance of an open connection: from now on it goes through the
    fault's toxics (which reset it at once under INSTANCE FAILURE or RESET)."""
    if not isinstance(backend.conn, ToxicConn):
        backend.conn = cluster.drills.wrap(backend.conn, backend.instance)
