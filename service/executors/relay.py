"""What every executor does with one worker run, wherever the worker ran: store its JSON-lines
events (`EventRelay`), then settle the job from its outcome (`settle`).

Shared by the local executor (lines read from the worker's pipe) and the Ray executor (lines
streamed back from the node), so a job's events and final state are the same on both.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantgate.service.executors.outcome import Outcome
from quantgate.service.executors.outputs import remove_job_outputs
from quantgate.service.store import JobRecord, Store

__all__ = [
    "MAX_LOG_EVENTS",
    "PROGRESS_MIN_INTERVAL_S",
    "SPEC_FILE",
    "EventRelay",
    "fail_job",
    "settle",
    "settle_lost",
    "write_spec",
]

logger = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_S = 0.25  # per job; stage changes and completions are always stored
MAX_LOG_EVENTS = 200  # stray (non-JSON) worker lines stored per run
SPEC_FILE = "spec.json"


def write_spec(job_dir: Path, job: JobRecord, /, **extra: Any) -> dict[str, Any]:
    """The worker's spec for this attempt (the request plus where and which attempt it is), written
    to `job_dir/spec.json` (the directory is created); returns it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    spec = {**job.request, "job_id": job.id, "output": job.output_path, **extra, "attempt": job.attempts}
    (job_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return spec


class EventRelay:
    """Stores one run's protocol lines as job events and keeps its final `result` / `error` event."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.log_events = 0
        self.last_progress: tuple[str | None, float] = (None, 0.0)
        self.pending_progress: dict[str, Any] | None = None

    def feed(self, line: str) -> None:
        """One line of the worker's stdout."""
        try:
            event = json.loads(line)
            kind = event.get("event") if isinstance(event, dict) else None
        except json.JSONDecodeError:
            kind = None
        if kind == "progress":
            self._progress(event)
        elif kind == "result":
            self.result = event
        elif kind == "error":
            self.error = event
        elif line.strip() and self.log_events < MAX_LOG_EVENTS:
            self.log_events += 1
            self.store.add_event(self.job_id, type="log", level="warning", message=line[:2000])

    def _progress(self, event: dict[str, Any]) -> None:
        """Store a progress event, coalescing bursts within one stage (the latest always lands)."""
        stage = str(event.get("stage") or "")
        fraction = event.get("fraction")
        now = time.monotonic()
        last_stage, last_time = self.last_progress
        important = stage != last_stage or fraction in (0, 0.0, 1, 1.0) or fraction is None
        if not important and now - last_time < PROGRESS_MIN_INTERVAL_S:
            self.pending_progress = event
            return
        if stage != last_stage:
            self.flush()
        self.pending_progress = None
        self.last_progress = (stage, now)
        self._record(event)

    def flush(self) -> None:
        """Store the coalesced progress event still pending, if any."""
        pending, self.pending_progress = self.pending_progress, None
        if pending is not None:
            self._record(pending)

    def _record(self, event: dict[str, Any]) -> None:
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        self.store.record_progress(
            self.job_id,
            stage=str(event.get("stage") or ""),
            fraction=event.get("fraction"),
            message=str(event.get("message", ""))[:2000],
            data=data,
        )


def fail_job(
    store: Store,
    job_id: str,
    *,
    error_code: str,
    message: str,
    from_statuses: tuple[str, ...] = ("running",),
) -> bool:
    """Fail a job the executor gave up on (it could not start, place or finish it), with the
    message as both its error and its last event; False if the job had left `from_statuses`."""
    return store.finish(
        job_id,
        status="failed",
        from_statuses=from_statuses,
        level="error",
        error_code=error_code,
        error_message=message,
        message=message,
    )


def _finish(store: Store, job_id: str, outcome: Outcome) -> bool:
    for warning in outcome.warnings[:50]:
        store.add_event(job_id, type="log", level="warning", message=str(warning)[:2000])
    return store.finish(
        job_id,
        status=outcome.status,
        from_statuses=("running",),
        level="info" if outcome.status == "succeeded" else "error",
        message=outcome.message,
        error_code=outcome.error_code,
        error_message=outcome.error_message,
        failed_output_path=outcome.failed_output,
        validation=outcome.validation,
        report=outcome.report,
        report_html=outcome.report_html,
    )


def settle(
    store: Store,
    job: JobRecord,
    outcome: Outcome,
    *,
    stopping: bool,
    notify: Callable[[str], None],
) -> None:
    """Move a run's job to its terminal status (or back to the queue on a graceful shutdown).

    A `running` job takes the outcome; a `cancelling` one becomes `cancelled`; during shutdown an
    unfinished run is requeued without using an attempt. Partial outputs are removed in every case
    but success (a failed validation keeps its export for inspection).
    """
    output = Path(job.output_path)
    if outcome.status == "succeeded" and _finish(store, job.id, outcome):
        notify(job.id)
        return
    if outcome.status == "failed" and not stopping:
        keep_failed = outcome.error_code == "validation_failed"
        remove_job_outputs(output, since=job.started_at, keep_failed=keep_failed, include_final=True)
        if _finish(store, job.id, outcome):
            notify(job.id)
            return
    remove_job_outputs(output, since=job.started_at, include_final=True)
    if store.finish(
        job.id,
        status="cancelled",
        from_statuses=("cancelling",),
        message="job cancelled; worker stopped and partial output removed",
    ):
        notify(job.id)
    elif stopping:
        store.requeue(
            job.id,
            refund_attempt=True,
            message="the server shut down while this job was running; requeued",
        )


def settle_lost(
    store: Store,
    job: JobRecord,
    reason: str,
    *,
    old_run_gone: bool,
    stopping: bool,
    max_attempts: int,
    notify: Callable[[str], None],
) -> None:
    """A run ended without an exit status (its host process or node died): remove partial output,
    then cancel a `cancelling` job, requeue a `running` one while it has attempts left, else fail it
    `worker_lost`. It is retried only when `old_run_gone` (the old worker is known to be dead), so
    a job never runs twice at once."""
    remove_job_outputs(Path(job.output_path), since=job.started_at, include_final=True)
    if store.finish(
        job.id, status="cancelled", from_statuses=("cancelling",), message="job cancelled; worker stopped"
    ):
        notify(job.id)
    elif stopping and old_run_gone:
        store.requeue(job.id, refund_attempt=True, message="the server shut down; requeued")
    elif old_run_gone and job.attempts < max_attempts:
        store.requeue(
            job.id,
            message=f"{reason}; partial output removed; requeued (attempt {job.attempts} of {max_attempts})",
        )
    else:
        left = "no attempt left" if old_run_gone else "not retried"
        message = f"{reason}; {left} ({job.attempts} of {max_attempts} used)"
        if fail_job(store, job.id, error_code="worker_lost", message=message):
            notify(job.id)
