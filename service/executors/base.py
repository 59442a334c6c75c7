"""The executor interface: how the service runs jobs. `LocalExecutor` runs worker processes on this
host; `RayExecutor` (service/executors/ray.py) runs the same worker on a Ray cluster.

Contract: the store is the source of truth. `submit` only wakes the dispatcher (the job row is
already `queued`); the executor claims queued jobs from the store, moves them to a terminal status
through the store's guarded transitions, and after `start()` has recovered what a previous server
left behind, no job runs twice at once.

`DispatchingExecutor` is the machinery both executors share: the dispatcher thread with its
wake-up event, the periodic purge of expired outputs, and the `on_finished` notification.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from quantgate.service.executors.outputs import purge_expired
from quantgate.service.settings import Settings
from quantgate.service.store import JobRecord, Store

__all__ = ["ClusterInfo", "DispatchingExecutor", "Executor", "ExecutorUnavailable", "SlotUsage"]

logger = logging.getLogger(__name__)

DISPATCH_POLL_S = 1.0  # the dispatcher also wakes without a submit, to see freed capacity
PURGE_EVERY_S = 3600.0


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


class DispatchingExecutor(Executor):
    """An executor whose dispatcher thread starts queued jobs in rounds: on every `submit`, every
    finished run, and at least every `DISPATCH_POLL_S`. Subclasses implement `_dispatch_round`."""

    dispatcher_name = "quantgate-dispatcher"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        on_finished: Callable[[JobRecord], None] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_finished = on_finished
        self.environ = dict(os.environ if environ is None else environ)   # the server's environment
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0

    @abstractmethod
    def _dispatch_round(self) -> None:
        """Start what can start now (called on the dispatcher thread only)."""

    def _start_dispatcher(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._dispatch_loop, name=self.dispatcher_name, daemon=True)
        self._thread.start()

    def _stop_dispatcher(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job_id: str) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before dispatching: a wake-up during this round is not lost
            try:
                self._dispatch_round()
                self._purge_if_due()
            except Exception:  # the dispatcher must survive anything one job does
                logger.exception("dispatcher iteration failed")
            self._wake.wait(timeout=DISPATCH_POLL_S)

    def _purge_if_due(self) -> None:
        now = time.time()
        if now - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = now
        purge_expired(self.store, self.settings.jobs_dir, self.settings.retention_days)

    def _notify(self, job_id: str) -> None:
        """Hand a job that reached a terminal status to `on_finished` (webhooks, metrics)."""
        if self.on_finished is not None:
            job = self.store.get_job(job_id)
            if job is not None:
                self.on_finished(job)
