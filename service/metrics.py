"""Prometheus metrics, on a private registry per app (tests and several apps never collide).

Job counts, queue depth, slot usage and (for a Ray executor) the cluster's reachability and GPUs
total/free are read from the store and the executor at scrape time,
so they are right after a restart; durations and validation verdicts are recorded as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from quantgate.service.executors.base import ClusterInfo, SlotUsage
from quantgate.service.store import JobRecord, Store

__all__ = ["Metrics"]

# Quantize jobs last minutes to hours.
DURATION_BUCKETS_S: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 18000)
# Gauges of a remote executor's cluster: (metric, help, ClusterInfo field).
CLUSTER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("quantgate_cluster_reachable", "1 when the cluster answers", "reachable"),
    ("quantgate_cluster_nodes", "Alive cluster nodes", "nodes"),
    ("quantgate_cluster_gpus", "GPUs in the cluster", "gpus_total"),
    ("quantgate_cluster_gpus_free", "GPUs no task holds", "gpus_free"),
    ("quantgate_cluster_cpus", "CPUs in the cluster", "cpus_total"),
    ("quantgate_cluster_cpus_free", "CPUs no task holds", "cpus_free"),
)


class _StateCollector(Collector):
    """Gauges computed from the store and the executor on every scrape."""

    def __init__(
        self,
        store: Store,
        slots: Callable[[], SlotUsage],
        cluster: Callable[[], ClusterInfo | None] | None = None,
    ) -> None:
        self.store = store
        self.slots = slots
        self.cluster = cluster

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.count_by_status()
        jobs = GaugeMetricFamily("quantgate_jobs", "Jobs in the store by status", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "quantgate_queue_depth", "Jobs waiting for a slot", value=counts.get("queued", 0)
        )
        usage = self.slots()
        yield GaugeMetricFamily(
            "quantgate_gpu_slots", "Execution slots (GPUs, or one CPU slot)", value=usage.total
        )
        yield GaugeMetricFamily("quantgate_gpu_slots_in_use", "Slots running a job", value=usage.in_use)
        cluster = self.cluster() if self.cluster is not None else None
        if cluster is not None:
            for name, documentation, field in CLUSTER_GAUGES:
                yield GaugeMetricFamily(name, documentation, value=float(getattr(cluster, field)))


class Metrics:
    """The app's metrics; `render()` is the /metrics body."""

    def __init__(
        self,
        store: Store,
        slots: Callable[[], SlotUsage],
        cluster: Callable[[], ClusterInfo | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(store, slots, cluster))
        self.job_duration = Histogram(
            "quantgate_job_duration_seconds",
            "Wall time of finished jobs, from start to finish",
            ["status"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.validations = Counter(
            "quantgate_validations",
            "Validations run through POST /v1/validations, by overall result",
            ["result"],
            registry=self.registry,
        )
        self.verdicts = Counter(
            "quantgate_validation_verdicts",
            "Per-engine verdicts of validations",
            ["engine", "verdict"],
            registry=self.registry,
        )

    def job_finished(self, job: JobRecord) -> None:
        if job.started_at is not None and job.finished_at is not None:
            self.job_duration.labels(job.status).observe(max(0.0, job.finished_at - job.started_at))

    def validation_done(self, ok: bool, verdicts: dict[str, Any]) -> None:
        self.validations.labels("ok" if ok else "errors").inc()
        for engine, verdict in verdicts.items():
            status = verdict.get("status") if isinstance(verdict, dict) else verdict
            self.verdicts.labels(engine, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
