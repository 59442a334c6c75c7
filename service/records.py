"""Rows of the store as frozen dataclasses, and the job statuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACTIVE",
    "STATUSES",
    "TERMINAL",
    "EventRecord",
    "IdempotencyConflict",
    "JobRecord",
    "OutputTaken",
    "ValidationRecord",
]

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: tuple[str, ...] = ("running", "cancelling")
STATUSES: tuple[str, ...] = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class OutputTaken(Exception):
    """Another unfinished job already writes to this output path."""


@dataclass(frozen=True)
class JobRecord:
    """One row of `jobs`, JSON columns decoded."""

    id: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    status: str
    request: dict[str, Any]
    output_path: str
    failed_output_path: str | None
    progress_stage: str | None
    progress_fraction: float | None
    error_code: str | None
    error_message: str | None
    validation: dict[str, Any] | None
    report: dict[str, Any] | None
    report_html: str | None
    attempts: int
    slot: str | None
    pid: int | None
    pgid: int | None
    queue_reason: str | None = None  # why a queued job waits (schema v2)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class EventRecord:
    """One row of `events` (status changes, progress, worker log lines)."""

    id: int
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ValidationRecord:
    """One row of `validations`: a stored validator report."""

    id: str
    created_at: float
    target: str
    revision: str | None
    ok: bool
    verdicts: dict[str, Any]
    report: dict[str, Any]
    report_html: str | None
