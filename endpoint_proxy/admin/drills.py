"""Drill commands shared by the admin console and the admin HTTP server: switchover, faults.

Both front ends resolve names the same way here, so ``SWITCHOVER`` and ``POST /switchover``,
``SIMULATE ...`` and ``POST /faults`` never disagree. An instance is named by its name when
that is unique across clusters, else as ``cluster.instance``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import trio

from ..drills.faults import Fault, FaultError, FaultSpec, parse_simulate, spec_from_json
from ..drills.switchover import SwitchoverRecord, SwitchoverRefused
from ..server.cluster import ClusterRuntime

Clusters = Mapping[str, ClusterRuntime]


def find_cluster(clusters: Clusters, name: str | None, *, instance: str | None = None) -> ClusterRuntime:
    """The cluster a command means: ``name``; else the one holding ``instance``; else the only
    one. Raises SwitchoverRefused (the caller's error) when that is unclear."""
    if name is not None:
        cluster = clusters.get(name)
        if cluster is None:
            raise SwitchoverRefused(f"no cluster named {name!r} (clusters: {', '.join(clusters) or 'none'})")
        return cluster
    if instance is not None:
        holding = [c for c in clusters.values() if instance in c.topology.instances]
        if len(holding) == 1:
            return holding[0]
        if len(holding) > 1:
            raise SwitchoverRefused(f"instance {instance!r} exists in clusters "
                                    f"{', '.join(c.config.name for c in holding)}: name the cluster")
    if len(clusters) == 1:
        return next(iter(clusters.values()))
    raise SwitchoverRefused(f"name the cluster (clusters: {', '.join(clusters) or 'none'})")


async def switchover(clusters: Clusters, cluster: str | None, to: str | None) -> SwitchoverRecord:
    """Run a planned switchover; SwitchoverRefused when it cannot start."""
    runtime = find_cluster(clusters, cluster, instance=to)
    return await runtime.drills.switchover(to)


def resolve_instance(clusters: Clusters, name: str, cluster: str | None = None) -> tuple[ClusterRuntime, str]:
    """(cluster, instance) for an instance name, ``cluster.instance``, or a name within ``cluster``."""
    if cluster is not None:
        runtime = clusters.get(cluster)
        if runtime is None:
            raise FaultError(f"no cluster named {cluster!r}")
        if name not in runtime.topology.instances:
            raise FaultError(f"cluster {cluster} has no instance named {name!r}")
        return runtime, name
    holding = [c for c in clusters.values() if name in c.topology.instances]
    if len(holding) == 1:
        return holding[0], name
    if len(holding) > 1:
        raise FaultError(f"instance {name!r} exists in clusters {', '.join(c.config.name for c in holding)}: "
                         f"write cluster.{name}")
    prefix, dot, rest = name.partition(".")
    if dot and prefix in clusters and rest in clusters[prefix].topology.instances:
        return clusters[prefix], rest
    known = ", ".join(f"{c.config.name}.{i}" for c in clusters.values() for i in c.topology.instance_names)
    raise FaultError(f"no instance named {name!r} (instances: {known or 'none'})")


def inject(clusters: Clusters, spec: FaultSpec, cluster: str | None = None) -> list[Fault]:
    """Register a fault in the cluster of its instance (FaultError when it names none);
    READ REPLICA FAILURE without an instance goes to every cluster (or ``cluster``)."""
    if spec.instance is None:
        targets = [clusters[cluster]] if cluster is not None and cluster in clusters else list(clusters.values())
        if cluster is not None and cluster not in clusters:
            raise FaultError(f"no cluster named {cluster!r}")
        return [c.drills.inject(spec) for c in targets]
    runtime, instance = resolve_instance(clusters, spec.instance, cluster)
    return [runtime.drills.inject(replace(spec, instance=instance))]


def inject_command(clusters: Clusters, command: str) -> list[Fault]:
    return inject(clusters, parse_simulate(command))


def inject_json(clusters: Clusters, doc: Mapping[str, Any]) -> list[Fault]:
    """POST /faults: ``{"kind": ..., ...}`` or ``{"command": "SIMULATE ..."}``."""
    if "command" in doc:
        command = doc["command"]
        if not isinstance(command, str) or len(doc) != 1:
            raise FaultError('"command" must be a string and the only key')
        return inject_command(clusters, command)
    cluster = doc.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise FaultError("cluster: must be a string")
    return inject(clusters, spec_from_json(doc), cluster)


def clear(clusters: Clusters, fault_id: int | None = None) -> list[Fault]:
    removed: list[Fault] = []
    for c in clusters.values():
        removed += c.drills.clear(fault_id)
    return sorted(removed, key=lambda f: f.id)


def active_faults(clusters: Clusters) -> list[Fault]:
    return sorted((f for c in clusters.values() for f in c.drills.active_faults()), key=lambda f: f.id)


def faults_json(clusters: Clusters) -> list[dict[str, Any]]:
    now = trio.current_time()
    return [f.to_json(now) for f in active_faults(clusters)]
