"""The job store: SQLite in WAL mode under the data dir, the single source of truth.

Every state change is one `BEGIN IMMEDIATE ... COMMIT` (synchronous=FULL) that finishes before the
caller acknowledges it. One connection is shared by the request threads and the dispatcher behind
a lock; SQLite serializes writers anyway and each statement is short. Status transitions are
guarded (`UPDATE ... WHERE status IN (...)`) so a cancel racing a finishing worker resolves to
exactly one outcome.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from quantgate.service.migrations import MIGRATIONS, SCHEMA_VERSION
from quantgate.service.records import (
    ACTIVE,
    STATUSES,
    TERMINAL,
    EventRecord,
    IdempotencyConflict,
    JobRecord,
    OutputTaken,
    ValidationRecord,
)

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "EventRecord",
    "IdempotencyConflict",
    "JobRecord",
    "OutputTaken",
    "Store",
    "ValidationRecord",
]

_JSON_COLUMNS = frozenset({"request", "validation", "report", "verdicts", "data"})


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    return {
        key: (json.loads(row[key]) if key in _JSON_COLUMNS and row[key] is not None else row[key])
        for key in row.keys()
    }


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


class Store:
    """All persistence of the service. Safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed before the block's result is used by anyone."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def migrate(self) -> int:
        """Apply every migration newer than the stored schema version; returns the version."""
        with self._tx() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"store {self.path} has schema v{current}, newer than this quantgate "
                    f"(v{SCHEMA_VERSION}); upgrade quantgate"
                )
            for version, script in MIGRATIONS:
                if version > current:
                    for statement in filter(str.strip, script.split(";")):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        return int(self._query("SELECT MAX(version) FROM schema_version")[0][0])

    def check_writable(self) -> bool:
        """A real write (for /readyz): False when the database cannot be written."""
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('ready_probe', ?)", (str(time.time()),)
                )
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs -------------------------------------------------------------------------------------
    def create_job(
        self,
        *,
        job_id: str,
        request: dict[str, Any],
        output_path: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job (and its idempotency key); returns (job, replayed).

        Raises IdempotencyConflict (key reused with another body) or OutputTaken.
        """
        now = time.time()
        with self._tx() as conn:
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT request_hash, job_id FROM idempotency_keys WHERE key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyConflict(idempotency_key)
                    return self._job(conn, row["job_id"]), True
            try:
                conn.execute(
                    "INSERT INTO jobs(id, created_at, updated_at, status, request, output_path) "
                    "VALUES (?,?,?,?,?,?)",
                    (job_id, now, now, "queued", _dumps(request), output_path),
                )
            except sqlite3.IntegrityError:
                raise OutputTaken(output_path) from None
            self._event(conn, job_id, "status", "info", "job queued", {"status": "queued"})
            if idempotency_key is not None:
                conn.execute(
                    "INSERT INTO idempotency_keys(key, request_hash, job_id, created_at) VALUES (?,?,?,?)",
                    (idempotency_key, request_hash, job_id, now),
                )
            return self._job(conn, job_id), False

    def idempotent_job(self, key: str, request_hash: str) -> JobRecord | None:
        """The job an Idempotency-Key created (same body), None if unused; IdempotencyConflict otherwise."""
        rows = self._query("SELECT request_hash, job_id FROM idempotency_keys WHERE key = ?", (key,))
        if not rows:
            return None
        if rows[0]["request_hash"] != request_hash:
            raise IdempotencyConflict(key)
        return self.get_job(rows[0]["job_id"])

    @staticmethod
    def _job(conn: sqlite3.Connection, job_id: str) -> JobRecord:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(**_decode(row))

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord(**_decode(rows[0])) if rows else None

    def list_jobs(self, *, after: str | None = None, limit: int = 20) -> tuple[list[JobRecord], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        sql, params = "SELECT * FROM jobs", []
        if after:
            sql += " WHERE id < ?"
            params.append(after)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit + 1])
        return [JobRecord(**_decode(row)) for row in rows[:limit]], len(rows) > limit

    def jobs_with_status(self, statuses: Sequence[str]) -> list[JobRecord]:
        marks = ",".join("?" * len(statuses))
        rows = self._query(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY id", tuple(statuses))
        return [JobRecord(**_decode(row)) for row in rows]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for row in self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            counts[row["status"]] = row["n"]
        return counts

    def claim_next(self, slot: str, *, job_id: str | None = None) -> JobRecord | None:
        """Oldest queued job (or `job_id`, if still queued) -> running on `slot` (attempts + 1);
        None when there is no such queued job."""
        now = time.time()
        with self._tx() as conn:
            if job_id is None:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1"
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' AND id = ?", (job_id,)
                ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status='running', slot=?, started_at=?, updated_at=?, attempts=attempts+1, "
                "pid=NULL, pgid=NULL, progress_stage=NULL, progress_fraction=NULL, queue_reason=NULL "
                "WHERE id=?",
                (slot, now, now, row["id"]),
            )
            job = self._job(conn, row["id"])
            self._event(
                conn,
                job.id,
                "status",
                "info",
                f"job running on slot {slot} (attempt {job.attempts})",
                {"status": "running", "slot": slot, "attempt": job.attempts},
            )
            return job

    def set_process(self, job_id: str, *, pid: int, pgid: int, slot: str | None = None) -> None:
        """Record the run's worker process (and, when given, where it runs: `slot`)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET pid=?, pgid=?, slot=COALESCE(?, slot), updated_at=? WHERE id=?",
                (pid, pgid, slot, time.time(), job_id),
            )

    def set_queue_reason(self, job_id: str, reason: str | None, *, level: str = "info") -> bool:
        """Why a queued job is not running yet; a changed reason is also stored as an event."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET queue_reason=?, updated_at=? WHERE id=? AND status='queued' "
                "AND queue_reason IS NOT ?",
                (reason, time.time(), job_id, reason),
            )
            if cursor.rowcount and reason:
                self._event(conn, job_id, "status", level, reason, {"status": "queued", "reason": reason})
            return bool(cursor.rowcount)

    def record_progress(
        self, job_id: str, *, stage: str, fraction: float | None, message: str, data: dict[str, Any]
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET progress_stage=?, progress_fraction=?, updated_at=? WHERE id=?",
                (stage, fraction, time.time(), job_id),
            )
            self._event(
                conn, job_id, "progress", "info", message, {"stage": stage, "fraction": fraction, **data}
            )

    def request_cancel(self, job_id: str) -> tuple[JobRecord, bool]:
        """queued -> cancelled, running -> cancelling; returns (job, worker_needs_stopping)."""
        now = time.time()
        with self._tx() as conn:
            job = self._job(conn, job_id)
            if job.status == "queued":
                conn.execute(
                    "UPDATE jobs SET status='cancelled', finished_at=?, updated_at=? WHERE id=?",
                    (now, now, job_id),
                )
                self._event(
                    conn, job_id, "status", "info", "job cancelled before it started", {"status": "cancelled"}
                )
            elif job.status == "running":
                conn.execute("UPDATE jobs SET status='cancelling', updated_at=? WHERE id=?", (now, job_id))
                self._event(
                    conn,
                    job_id,
                    "status",
                    "info",
                    "cancel requested; stopping the worker",
                    {"status": "cancelling"},
                )
            return self._job(conn, job_id), job.status in ("running", "cancelling")

    def finish(
        self,
        job_id: str,
        *,
        status: str,
        from_statuses: Sequence[str],
        message: str,
        level: str = "info",
        error_code: str | None = None,
        error_message: str | None = None,
        failed_output_path: str | None = None,
        validation: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
        report_html: str | None = None,
    ) -> bool:
        """Guarded move to a terminal status; False (nothing written) unless the job is in `from_statuses`."""
        now = time.time()
        marks = ",".join("?" * len(from_statuses))
        with self._tx() as conn:
            cursor = conn.execute(
                f"UPDATE jobs SET status=?, finished_at=?, updated_at=?, error_code=?, error_message=?, "
                f"failed_output_path=?, validation=COALESCE(?, validation), report=COALESCE(?, report), "
                f"report_html=COALESCE(?, report_html), pid=NULL, pgid=NULL "
                f"WHERE id=? AND status IN ({marks})",
                (
                    status,
                    now,
                    now,
                    error_code,
                    error_message,
                    failed_output_path,
                    _dumps(validation),
                    _dumps(report),
                    report_html,
                    job_id,
                    *from_statuses,
                ),
            )
            if cursor.rowcount == 0:
                return False
            data: dict[str, Any] = {"status": status}
            if error_code:
                data["error"] = {"code": error_code, "message": error_message}
            self._event(conn, job_id, "status", level, message, data)
            return True

    def requeue(self, job_id: str, *, message: str, refund_attempt: bool = False) -> bool:
        """running/cancelling -> queued (after a crash or a graceful shutdown)."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status='queued', updated_at=?, slot=NULL, pid=NULL, pgid=NULL, "
                "queue_reason=NULL, "
                "started_at=NULL, "
                "progress_stage=NULL, progress_fraction=NULL, attempts=attempts-? "
                "WHERE id=? AND status IN ('running','cancelling')",
                (time.time(), int(refund_attempt), job_id),
            )
            if cursor.rowcount:
                self._event(conn, job_id, "status", "warning", message, {"status": "queued"})
            return bool(cursor.rowcount)

    # -- events -----------------------------------------------------------------------------------
    @staticmethod
    def _event(
        conn: sqlite3.Connection, job_id: str, type_: str, level: str, message: str, data: dict[str, Any]
    ) -> None:
        conn.execute(
            "INSERT INTO events(job_id, created_at, level, type, message, data) VALUES (?,?,?,?,?,?)",
            (job_id, time.time(), level, type_, message, _dumps(data)),
        )

    def add_event(
        self, job_id: str, *, type: str, level: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self._tx() as conn:
            self._event(conn, job_id, type, level, message, data or {})

    def list_events(
        self, job_id: str, *, after: int | None = None, limit: int = 100
    ) -> tuple[list[EventRecord], bool]:
        """Oldest first, ids strictly greater than `after`."""
        rows = self._query(
            "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
            (job_id, after or 0, limit + 1),
        )
        return [EventRecord(**_decode(row)) for row in rows[:limit]], len(rows) > limit

    # -- validations ------------------------------------------------------------------------------
    def create_validation(self, record: ValidationRecord) -> ValidationRecord:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO validations"
                "(id, created_at, target, revision, ok, verdicts, report, report_html) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (
                    record.id,
                    record.created_at,
                    record.target,
                    record.revision,
                    int(record.ok),
                    _dumps(record.verdicts),
                    _dumps(record.report),
                    record.report_html,
                ),
            )
        return record

    def get_validation(self, validation_id: str) -> ValidationRecord | None:
        rows = self._query("SELECT * FROM validations WHERE id = ?", (validation_id,))
        if not rows:
            return None
        fields = _decode(rows[0])
        return ValidationRecord(**{**fields, "ok": bool(fields["ok"])})

    # -- retention --------------------------------------------------------------------------------
    def purge_before(self, cutoff: float) -> list[str]:
        """Delete finished jobs (events, keys) and validations older than `cutoff`; returns the job ids."""
        with self._tx() as conn:
            ids = [
                row["id"]
                for row in conn.execute(
                    "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? AND status IN "
                    "('succeeded','failed','cancelled')",
                    (cutoff,),
                )
            ]
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in ids])
            conn.execute("DELETE FROM validations WHERE created_at < ?", (cutoff,))
        return ids
