"""The executor interface: how the service runs jobs. `LocalExecutor` runs worker processes on this
host; a Ray executor (tasks with `num_gpus`) will implement the same interface.

Contract: the store is the source of truth. `submit` only wakes the dispatcher (the job row is
already `queued`); the executor claims queued jobs from the store, moves them to a terminal status
through the store's guarded transitions, and after `start()` has recovered what a previous server
left behind, no job runs twice at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["Executor", "SlotUsage"]


@dataclass(frozen=True)
class SlotUsage:
    """Execution capacity: `total` slots (GPUs, or CPU), `in_use` of them, `concurrency` allowed."""

    total: int
    in_use: int
    concurrency: int
    devices: tuple[str, ...]


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
