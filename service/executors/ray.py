"""The Ray executor (`quantgate serve --executor ray`): every job runs on a Ray cluster node.

A dispatcher thread reads the cluster (`ray.nodes()`, `ray.available_resources()`) and the queue
(oldest first). A job that fits some node but not now waits, with the reason on the job; one that
no node can ever fit (more GPUs than the largest node has) waits too, and fails `unschedulable`
after `unschedulable_timeout_seconds`. A job that fits is claimed and handed to a `JobRunner`
actor (ray_task.py) created with `num_gpus` = the job's `gpus` and `num_cpus` =
`ray_cpus_per_job`; the actor runs `python -m quantgate.service.worker SPEC` on its node and streams the
worker's JSON lines back (a streaming generator), which a monitor thread per job stores exactly
as for local jobs (`EventRelay`, `settle`).

Cancel: the actor SIGTERMs the worker's group (SIGKILL after the grace period), then the actor is
killed (`ray.kill`), which returns its GPUs and CPUs to Ray. A run whose actor dies (worker
process killed, node lost) has the rest of its group killed on that node, its partial output
removed, and is requeued while it has attempts left (`max_attempts`), else failed `worker_lost`.
A run is retried only once its old worker is known to be gone, so a job never runs twice at once.
Outputs must be on storage the service and every node share (same path everywhere).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantgate.service.executors.base import ClusterInfo, DispatchingExecutor, ExecutorUnavailable, SlotUsage
from quantgate.service.executors.outcome import interpret
from quantgate.service.executors.ray_cluster import NOTHING, Need, Snapshot, place, probe, snapshot_from_ray
from quantgate.service.executors.ray_task import JobRunner
from quantgate.service.executors.recovery import kill_orphaned_group, recover
from quantgate.service.executors.relay import EventRelay, fail_job, settle, settle_lost, write_spec
from quantgate.service.settings import Settings
from quantgate.service.store import JobRecord, Store

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # the optional extra is not installed
    raise ExecutorUnavailable(
        "the Ray executor needs ray: pip install 'quantgate[ray]' (or run with --executor local)"
    ) from exc

__all__ = ["SLOT_PREFIX", "RayExecutor"]

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "quantgate"
SLOT_PREFIX = "ray:"  # job.slot once its worker runs: "ray:<node id>"
SLOT_PLACING = "ray"  # claimed, actor not placed / worker not started yet
KILL_ON_NODE_TIMEOUT_S = 30.0
FORCE_KILL_MARGIN_S = 15.0  # after the grace period, the actor itself is killed
UNLIMITED = 1 << 30
BEHIND = "queued behind an earlier job that is waiting for resources"


@dataclass
class _RayRun:
    job: JobRecord
    need: Need
    actor: Any
    stream: Any
    relay: EventRelay
    job_dir: Path
    monitor: threading.Thread | None = None
    started: bool = False
    node_id: str | None = None
    stop_requested: bool = False


def _job_need(job: JobRecord, cpus: float) -> Need:
    return Need(gpus=int(job.request.get("gpus", 1)), cpus=cpus)


class RayExecutor(DispatchingExecutor):
    """Jobs as Ray actors on a cluster; connects at construction (ExecutorUnavailable if it cannot)."""

    dispatcher_name = "quantgate-ray-dispatcher"

    def __init__(self, settings: Settings, store: Store, **kwargs: Any) -> None:
        super().__init__(settings, store, **kwargs)
        self.address = settings.ray_address
        self.concurrency_limit = UNLIMITED if settings.max_concurrency is None else settings.max_concurrency
        self._runs: dict[str, _RayRun] = {}
        self._unschedulable_since: dict[str, float] = {}
        self._hf_token = settings.hf_token.get_secret_value() if settings.hf_token else None
        probe(self.address)
        try:
            ray.init(
                address=self.address,
                namespace=RAY_NAMESPACE,
                log_to_driver=False,
                ignore_reinit_error=True,
                logging_level=logging.WARNING,
            )
        except Exception as exc:  # noqa: BLE001 - reported as a start-up error, not a traceback
            raise ExecutorUnavailable(
                f"cannot connect to the Ray cluster at {self.address or 'RAY_ADDRESS / a local instance'}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._runner = ray.remote(JobRunner)
        self._killer = ray.remote(kill_orphaned_group)
        self._snapshot = Snapshot(reachable=False, address=self.address, error="not read yet")
        self._refresh_cluster()

    # -- Executor ---------------------------------------------------------------------------------
    def start(self) -> None:
        recover(self.store, max_attempts=self.settings.max_attempts, kill_group=self._kill_leftovers_at_start)
        self._start_dispatcher()
        info = self._snapshot.info()
        logger.info(
            "ray executor: %d node(s), %g GPU(s), %g CPU(s); %g CPU(s) per job",
            info.nodes,
            info.gpus_total,
            info.cpus_total,
            self.settings.ray_cpus_per_job,
        )

    def stop(self) -> None:
        self._stop_dispatcher()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._stop_run(run)
        for run in runs:
            if run.monitor is not None:
                run.monitor.join(timeout=self.settings.cancel_grace_seconds + FORCE_KILL_MARGIN_S + 30)
        ray.shutdown()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            self._stop_run(run)

    def slots(self) -> SlotUsage:
        snapshot = self._snapshot
        if snapshot.gpus_total:
            total = int(snapshot.gpus_total)
        else:
            total = int(snapshot.cpus_total // self.settings.ray_cpus_per_job)
        with self._lock:
            in_use = len(self._runs)
        return SlotUsage(
            total=total,
            in_use=in_use,
            concurrency=min(total, self.concurrency_limit),
            devices=tuple(SLOT_PREFIX + node.node_id for node in snapshot.nodes),
        )

    def cluster(self) -> ClusterInfo:
        return self._snapshot.info()

    # -- the cluster ------------------------------------------------------------------------------
    def _refresh_cluster(self) -> None:
        try:
            self._snapshot = snapshot_from_ray(ray.nodes(), ray.available_resources(), self.address)
        except Exception as exc:  # noqa: BLE001 - unreachable is a state, shown by /readyz
            self._snapshot = Snapshot(
                reachable=False, address=self.address, error=f"{type(exc).__name__}: {exc}"
            )

    def _kill_leftovers_at_start(self, job: JobRecord) -> bool:
        """Recovery's group killer. A node that is alive but does not answer is logged: Ray ends
        the dead server's actors (their owner died) and a node cut off from the GCS stops its
        raylet and workers, so the job is still settled as usual."""
        try:
            return self._kill_leftovers(job)
        except TimeoutError as exc:
            logger.warning("job %s: %s", job.id, exc)
            return False

    def _kill_leftovers(self, job: JobRecord) -> bool:
        """Kill what is left of `job`'s worker group on the node that ran it; True if anything was.

        Raises TimeoutError when the node is alive but did not answer (the job must not be retried).
        """
        slot = job.slot or ""
        if not slot.startswith(SLOT_PREFIX):
            return kill_orphaned_group(job) if slot not in ("", SLOT_PLACING) else False  # a local run
        node_id = slot[len(SLOT_PREFIX) :]
        if node_id not in self._snapshot.node_ids():
            return False  # the node is gone, and its processes with it
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        ref = self._killer.options(num_cpus=0, max_retries=0, scheduling_strategy=strategy).remote(job)
        try:
            return bool(ray.get(ref, timeout=KILL_ON_NODE_TIMEOUT_S))
        except Exception as exc:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                logger.debug("cancelling the kill task failed", exc_info=True)
            raise TimeoutError(f"could not reach node {node_id[:12]} to stop the old worker: {exc}") from exc

    # -- dispatching ------------------------------------------------------------------------------
    def _dispatch_round(self) -> None:
        self._refresh_cluster()
        self._dispatch_ready()

    def _note(self, job: JobRecord, reason: str, level: str = "info") -> None:
        if job.queue_reason != reason:
            self.store.set_queue_reason(job.id, reason, level=level)

    def _dispatch_ready(self) -> None:
        queued = self.store.jobs_with_status(("queued",))
        for gone in set(self._unschedulable_since) - {job.id for job in queued}:
            self._unschedulable_since.pop(gone, None)
        snapshot = self._snapshot
        if not snapshot.reachable:
            for job in queued:
                self._note(job, f"waiting for the Ray cluster, which does not answer ({snapshot.error})")
            return
        with self._lock:
            runs = list(self._runs.values())
        held = sum((run.need for run in runs), NOTHING)
        pending = sum((run.need for run in runs if not run.started), NOTHING)
        running, blocked = len(runs), False
        for job in queued:
            if self._stopping.is_set():
                return
            need = _job_need(job, self.settings.ray_cpus_per_job)
            placement = place(need, snapshot, held=held, pending=pending)
            if not placement.fits_ever:
                self._unschedulable(job, placement.reason or "unschedulable")
                continue
            self._unschedulable_since.pop(job.id, None)
            if blocked:
                self._note(job, BEHIND)
            elif running >= self.concurrency_limit:
                self._note(job, f"waiting for a slot: max concurrency {self.concurrency_limit} reached")
                blocked = True
            elif not placement.fits_now:
                self._note(job, placement.reason or "waiting for free resources")
                blocked = True
            elif self._launch(job, need):
                held, pending, running = held + need, pending + need, running + 1

    def _unschedulable(self, job: JobRecord, reason: str) -> None:
        timeout = self.settings.unschedulable_timeout_seconds
        since = self._unschedulable_since.setdefault(job.id, time.monotonic())
        if time.monotonic() - since < timeout:
            self._note(job, f"{reason}; the job fails if no such node joins within {timeout:g}s", "warning")
            return
        message = f"{reason}; gave up after {timeout:g}s (unschedulable_timeout_seconds)"
        self._unschedulable_since.pop(job.id, None)
        if fail_job(
            self.store, job.id, error_code="unschedulable", message=message, from_statuses=("queued",)
        ):
            self._notify(job.id)

    def _launch(self, queued: JobRecord, need: Need) -> bool:
        job = self.store.claim_next(SLOT_PLACING, job_id=queued.id)
        if job is None:  # cancelled since the queue was read
            return False
        job_dir = self.settings.jobs_dir / job.id
        spec = write_spec(job_dir, job)  # the worker's own directory is on its node
        try:
            actor = self._runner.options(
                num_gpus=need.gpus, num_cpus=need.cpus, max_concurrency=2, max_restarts=0, max_task_retries=0
            ).remote(job.id)
            stream = actor.run.options(num_returns="streaming").remote(spec, self._hf_token)
        except Exception as exc:  # noqa: BLE001 - reported on the job
            logger.exception("job %s: could not create its Ray actor", job.id)
            fail_job(
                self.store,
                job.id,
                error_code="launch_failed",
                message=f"could not start the job on the Ray cluster: {type(exc).__name__}: {exc}",
                from_statuses=("running", "cancelling"),
            )
            return False
        run = _RayRun(
            job=job,
            need=need,
            actor=actor,
            stream=stream,
            relay=EventRelay(self.store, job.id),
            job_dir=job_dir,
        )
        run.monitor = threading.Thread(
            target=self._monitor, args=(run,), name=f"ray-job-{job.id}", daemon=True
        )
        with self._lock:
            self._runs[job.id] = run
        run.monitor.start()
        if self.store.get_job(job.id).status == "cancelling":  # cancelled between claim and launch
            self._stop_run(run)
        logger.info("job %s: Ray actor requested (%d GPU(s), %g CPU(s))", job.id, need.gpus, need.cpus)
        return True

    # -- stopping ---------------------------------------------------------------------------------
    def _stop_run(self, run: _RayRun) -> None:
        """Graceful stop through the actor (the worker's group gets SIGTERM, then SIGKILL); the
        actor itself is killed after the grace period if the run has not ended by then."""
        with self._lock:
            if run.stop_requested:
                return
            run.stop_requested = True
            started = run.started
        grace = self.settings.cancel_grace_seconds
        if not started:  # not placed yet, or no worker yet: nothing to stop gracefully
            self._kill_actor(run)
            return
        run.actor.stop.remote(grace)
        timer = threading.Timer(grace + FORCE_KILL_MARGIN_S, self._kill_actor, args=(run,))
        timer.daemon = True
        timer.start()

    def _kill_actor(self, run: _RayRun) -> None:
        try:
            ray.kill(run.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            logger.debug("job %s: actor already gone", run.job.id)

    # -- one run ----------------------------------------------------------------------------------
    def _monitor(self, run: _RayRun) -> None:
        exit_item: dict[str, Any] | None = None
        lost = "the Ray worker ended without reporting the worker's exit status"
        try:
            for ref in run.stream:
                item = ray.get(ref)
                kind = item.get("kind")
                if kind == "line":
                    run.relay.feed(item["line"])
                elif kind == "started":
                    self._started(run, item)
                elif kind == "exit":
                    exit_item = item
            run.relay.flush()
        except ray.exceptions.RayError as exc:
            lost = f"the Ray worker running this job was lost ({type(exc).__name__}: {str(exc)[:500]})"
        except Exception as exc:  # noqa: BLE001 - a broken relay must not strand the job
            logger.exception("job %s: relaying worker output failed", run.job.id)
            lost = f"relaying the job's events failed: {type(exc).__name__}: {exc}"
        finally:
            self._kill_actor(run)  # frees its GPUs/CPUs now, not when Ray collects it
        try:
            if exit_item is not None:
                self._settle_exit(run, exit_item)
            else:
                self._settle_lost(run, lost)
        except Exception:  # noqa: BLE001
            logger.exception("job %s: settling failed", run.job.id)
        finally:
            with self._lock:
                self._runs.pop(run.job.id, None)
            self._wake.set()

    def _started(self, run: _RayRun, item: dict[str, Any]) -> None:
        node_id = str(item["node_id"])
        self.store.set_process(
            run.job.id, pid=int(item["pid"]), pgid=int(item["pgid"]), slot=SLOT_PREFIX + node_id
        )
        self.store.add_event(
            run.job.id,
            type="log",
            level="info",
            message=f"worker pid {item['pid']} started on Ray node {item['node_ip']} ({node_id[:12]}), "
            f"devices {item['devices']}",
            data={"node_id": node_id, "node_ip": item["node_ip"], "devices": item["devices"]},
        )
        with self._lock:
            run.started, run.node_id = True, node_id
            stop_now = run.stop_requested
        if stop_now:  # a cancel arrived while the actor was being placed
            run.actor.stop.remote(self.settings.cancel_grace_seconds)

    def _settle_exit(self, run: _RayRun, item: dict[str, Any]) -> None:
        with open(run.job_dir / "worker.log", "a", encoding="utf-8") as log:
            log.write(
                f"--- attempt {run.job.attempts} on Ray node {run.node_id}\n{item.get('log_tail') or ''}"
            )
        outcome = interpret(
            int(item["returncode"]),
            run.relay.result,
            run.relay.error,
            list(item.get("stderr_tail") or []),
            item.get("report_html") if run.relay.result else None,
        )
        settle(self.store, run.job, outcome, stopping=self._stopping.is_set(), notify=self._notify)

    def _settle_lost(self, run: _RayRun, reason: str) -> None:
        """The actor died: stop what is left on its node, then retry or fail the job."""
        self._refresh_cluster()
        current = self.store.get_job(run.job.id)
        if current is None:
            return
        confirmed = True
        try:
            self._kill_leftovers(current)
        except TimeoutError as exc:
            confirmed, reason = False, f"{reason}; {exc}"
        settle_lost(
            self.store,
            current,
            reason,
            old_run_gone=confirmed,
            stopping=self._stopping.is_set(),
            max_attempts=self.settings.max_attempts,
            notify=self._notify,
        )
