"""What the Ray executor knows about its cluster, and where a job can go: pure functions over a
snapshot of `ray.nodes()` and `ray.available_resources()` (no ray import; unit-testable).

A job needs `gpus` GPUs and `cpus` CPUs on ONE node (its worker is one process tree). It is
*unschedulable* when no alive node has that many in total (it would wait forever: the executor
fails it after a timeout), and *waiting* when the cluster could run it but not now.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from quantgate.service.executors.base import ClusterInfo, ExecutorUnavailable

__all__ = ["Need", "NodeCapacity", "Placement", "Snapshot", "place", "probe", "snapshot_from_ray"]

GPU = "GPU"
CPU = "CPU"
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeCapacity:
    """An alive node's total resources."""

    node_id: str
    address: str
    gpus: float
    cpus: float


@dataclass(frozen=True)
class Need:
    """What one job asks of a node."""

    gpus: int
    cpus: float

    def __add__(self, other: Need) -> Need:
        return Need(gpus=self.gpus + other.gpus, cpus=self.cpus + other.cpus)


NOTHING = Need(gpus=0, cpus=0.0)


@dataclass(frozen=True)
class Snapshot:
    """The cluster as last seen by the dispatcher."""

    reachable: bool
    address: str | None
    nodes: tuple[NodeCapacity, ...] = ()
    gpus_free: float = 0.0
    cpus_free: float = 0.0
    error: str | None = None
    taken_at: float = 0.0

    @property
    def gpus_total(self) -> float:
        return sum(node.gpus for node in self.nodes)

    @property
    def cpus_total(self) -> float:
        return sum(node.cpus for node in self.nodes)

    def node_ids(self) -> set[str]:
        return {node.node_id for node in self.nodes}

    def info(self) -> ClusterInfo:
        return ClusterInfo(
            reachable=self.reachable,
            address=self.address,
            nodes=len(self.nodes),
            gpus_total=self.gpus_total,
            gpus_free=self.gpus_free,
            cpus_total=self.cpus_total,
            cpus_free=self.cpus_free,
            error=self.error,
        )


def snapshot_from_ray(
    nodes: Iterable[Mapping[str, Any]], available: Mapping[str, float], address: str | None
) -> Snapshot:
    """A snapshot from `ray.nodes()` (alive ones count) and `ray.available_resources()`."""
    alive = tuple(
        NodeCapacity(
            node_id=str(node.get("NodeID", "")),
            address=str(node.get("NodeManagerAddress", "")),
            gpus=float((node.get("Resources") or {}).get(GPU, 0.0)),
            cpus=float((node.get("Resources") or {}).get(CPU, 0.0)),
        )
        for node in nodes
        if node.get("Alive")
    )
    return Snapshot(
        reachable=True,
        address=address,
        nodes=alive,
        gpus_free=float(available.get(GPU, 0.0)),
        cpus_free=float(available.get(CPU, 0.0)),
        taken_at=time.time(),
    )


@dataclass(frozen=True)
class Placement:
    """Whether a job can run on the cluster ever / now, and why not (shown on the queued job)."""

    fits_ever: bool
    fits_now: bool
    reason: str | None


def _never(need: Need, snapshot: Snapshot) -> str | None:
    largest_gpus = max((node.gpus for node in snapshot.nodes), default=0.0)
    largest_cpus = max((node.cpus for node in snapshot.nodes), default=0.0)
    where = f"{len(snapshot.nodes)} node(s), {snapshot.gpus_total:g} GPU(s) in total"
    if need.gpus > largest_gpus:
        return (
            f"unschedulable: the job needs {need.gpus} GPU(s) on one node, but the largest node of "
            f"the Ray cluster has {largest_gpus:g} ({where})"
        )
    if need.cpus > largest_cpus:
        return (
            f"unschedulable: the job needs {need.cpus:g} CPU(s) on one node (ray_cpus_per_job), but "
            f"the largest node of the Ray cluster has {largest_cpus:g} ({where})"
        )
    return None


def place(need: Need, snapshot: Snapshot, *, held: Need = NOTHING, pending: Need = NOTHING) -> Placement:
    """Can `need` run now? `held`: what this service's runs hold; `pending`: the part of it Ray
    may not show as taken yet (runs whose worker has not started).

    Free = min(what Ray reports free minus our pending runs, the cluster total minus all our
    runs): the second bound is exact for our own jobs, the first sees other tenants' tasks.
    """
    never = _never(need, snapshot)
    if never is not None:
        return Placement(fits_ever=False, fits_now=False, reason=never)
    free_gpus = min(snapshot.gpus_free - pending.gpus, snapshot.gpus_total - held.gpus)
    free_cpus = min(snapshot.cpus_free - pending.cpus, snapshot.cpus_total - held.cpus)
    if need.gpus <= free_gpus and need.cpus <= free_cpus:
        return Placement(fits_ever=True, fits_now=True, reason=None)
    return Placement(
        fits_ever=True,
        fits_now=False,
        reason=(
            f"waiting for free resources: the job needs {need.gpus} GPU(s) and {need.cpus:g} CPU(s) "
            f"on one node; the Ray cluster ({snapshot.gpus_total:g} GPU(s), {snapshot.cpus_total:g} "
            f"CPU(s)) has not that much free"
        ),
    )


def probe(address: str | None) -> None:
    """Fail fast (ExecutorUnavailable) when an explicit `host:port` does not accept connections:
    `ray.init` would otherwise retry for minutes."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorUnavailable(f"--ray-address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ExecutorUnavailable(
            f"cannot reach the Ray cluster at {address}: {exc} (is the head running? `ray status`)"
        ) from exc
