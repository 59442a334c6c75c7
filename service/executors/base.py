"""The executor interface: how the service runs jobs. `LocalExecutor` runs worker processes on this
host; `RayExecutor` (service/executors/ray.py) runs the same worker on a Ray cluster.

Contract: the store is the source of truth. `submit` only wakes the dispatcher (the job row is
already `queued`); the executor claims queued jobs from the store, moves them to a terminal status
through the store's guarded transitions, and after `start()` has recovered what a previous server
left behind, no job runs twice at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["ClusterInfo", "Executor", "ExecutorUnavailable", "SlotUsage"]


@dataclass(frozen=True)
class SlotUsage:
    """Execution capacity: `total` slots (GPUs, or CPU), `in_use` of them, `concurrency` allowed."""

    total: int
    in_use: int
    concurrency: int
    devices: tuple[str, ...]


@dataclass(frozen=True)
class ClusterInfo:
    """The compute cluster behind a remote executor (for /readyz and /metrics)."""

    reachable: bool
    address: str | None
    nodes: int = 0
    gpus_total: float = 0.0
    gpus_free: float = 0.0
    cpus_total: float = 0.0
    cpus_free: float = 0.0
    error: str | None = None


class ExecutorUnavailable(RuntimeError):
    """The executor cannot run (its backend is not installed, or its cluster cannot be reached)."""


class Executor(ABC):
    """Runs queued jobs from the store and reports their progress and outcome back into it."""

    @abstractmethod
    def start(self) -> None:
        """Recover jobs left active by a previous server, then start dispatching."""

    @abstractmethod
    def stop(self) -> None:
        """Stop dispatching; stop running workers and requeue their jobs (graceful shutdown)."""

    @abstractmethod
    def submit(self, job_id: str) -> None:
        """A job was queued: dispatch it when a slot is free."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """The job is `cancelling`: stop its worker (SIGTERM, then SIGKILL after the grace period)."""

    @abstractmethod
    def alive(self) -> bool:
        """True while the dispatcher is running (for /readyz)."""

    @abstractmethod
    def slots(self) -> SlotUsage:
        """Current capacity and usage (for /metrics and /readyz)."""

    def cluster(self) -> ClusterInfo | None:
        """The cluster the jobs run on, or None when they run on this host."""
        return None
