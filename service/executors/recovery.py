"""Start-up recovery: what a dead server left behind.

For every job still `running` or `cancelling` in the store: its worker process group (pid/pgid are
recorded in the store) is killed if it is still alive, so no job ever runs twice at once; its
partial outputs are removed; then `cancelling` -> `cancelled`, `running` -> `queued` while it has
attempts left, else `failed` with error code `interrupted`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.service.executors.outputs import remove_job_outputs
from quantgate.service.executors.process import process_alive
from quantgate.service.executors.relay import fail_job
from quantgate.service.store import ACTIVE, JobRecord, Store

__all__ = ["RecoveryReport", "kill_orphaned_group", "recover"]

logger = logging.getLogger(__name__)

WORKER_MODULE = "quantgate.service.worker"
ORPHAN_EXIT_TIMEOUT_S = 10.0


@dataclass
class RecoveryReport:
    requeued: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    killed_groups: list[int] = field(default_factory=list)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of `pid`, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid` (a worker's session id is its pid)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == sid and stat[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def _is_worker_of(pid: int, job_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return WORKER_MODULE in argv and any(job_id in arg for arg in argv)


def kill_orphaned_group(job: JobRecord) -> bool:
    """SIGKILL what is left of `job`'s worker session and wait for it to die; True if anything was killed.

    A live leader must still be our worker for this job (its command line names the job), so a
    recycled pid is never signalled; members whose leader is gone still carry its session id,
    which Linux does not reuse while they live.
    """
    if job.pgid is None:
        return False
    if job.pid is not None and process_alive(job.pid) and not _is_worker_of(job.pid, job.id):
        logger.warning("job %s: pid %d is alive but is not its worker; leaving it alone", job.id, job.pid)
        return False
    members = _session_members(job.pgid)
    if not members:
        return False
    logger.warning(
        "job %s: killing orphaned worker group %d (%d process(es))", job.id, job.pgid, len(members)
    )
    try:
        os.killpg(job.pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in members:  # members that left the group but not the session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + ORPHAN_EXIT_TIMEOUT_S
    while _session_members(job.pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def recover(
    store: Store,
    *,
    max_attempts: int,
    kill_group: Callable[[JobRecord], bool] = kill_orphaned_group,
) -> RecoveryReport:
    """Settle every job a previous server left active (see module docstring).

    `kill_group(job)` stops what is left of a job's worker wherever it ran (this host by default;
    the Ray executor kills it on the node that ran it) and returns True if it killed anything.
    """
    report = RecoveryReport()
    active = store.jobs_with_status(ACTIVE)
    for job in active:
        if kill_group(job):
            report.killed_groups.append(job.pgid or 0)
    for job in active:
        removed = remove_job_outputs(Path(job.output_path), since=job.started_at, include_final=True)
        cleaned = f"; removed {len(removed)} partial output(s)" if removed else ""
        if job.status == "cancelling":
            store.finish(
                job.id,
                status="cancelled",
                from_statuses=("cancelling",),
                message=f"cancelled (the server stopped while the worker was stopping){cleaned}",
            )
            report.cancelled.append(job.id)
        elif job.attempts < max_attempts:
            store.requeue(
                job.id,
                message=f"the server stopped while this job was running (attempt {job.attempts} "
                f"of {max_attempts}); requeued{cleaned}",
            )
            report.requeued.append(job.id)
        else:
            message = (
                f"interrupted: the server stopped while this job was running, and it has used all "
                f"{max_attempts} attempt(s){cleaned}"
            )
            fail_job(store, job.id, error_code="interrupted", message=message)
            report.interrupted.append(job.id)
    if active:
        logger.warning(
            "recovered %d job(s): %d requeued, %d interrupted, %d cancelled",
            len(active),
            len(report.requeued),
            len(report.interrupted),
            len(report.cancelled),
        )
    return report
