"""SQLite schema, one migration per version. Append new versions; never edit a shipped one."""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE jobs (
            id                 TEXT PRIMARY KEY,          -- qjob_<ulid>, sorts by creation
            created_at         REAL NOT NULL,
            updated_at         REAL NOT NULL,
            started_at         REAL,
            finished_at        REAL,
            status             TEXT NOT NULL,             -- see service.records.STATUSES
            request            TEXT NOT NULL,             -- the validated JobCreate body (JSON)
            output_path        TEXT NOT NULL,             -- final location (exists only once succeeded)
            failed_output_path TEXT,                      -- kept export that failed validation
            progress_stage     TEXT,
            progress_fraction  REAL,
            error_code         TEXT,
            error_message      TEXT,
            validation         TEXT,                      -- summary JSON {ok, verdicts, errors, warnings}
            report             TEXT,                      -- full validator report JSON
            report_html        TEXT,
            attempts           INTEGER NOT NULL DEFAULT 0,
            slot               TEXT,
            pid                INTEGER,                   -- worker process (group leader) of the current run
            pgid               INTEGER
        );
        CREATE INDEX jobs_status ON jobs(status, id);
        -- two unfinished jobs never write to the same output directory
        CREATE UNIQUE INDEX jobs_unfinished_output ON jobs(output_path)
            WHERE status IN ('queued', 'running', 'cancelling');
        CREATE TABLE events (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id     TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            created_at REAL NOT NULL,
            level      TEXT NOT NULL,                     -- info|warning|error
            type       TEXT NOT NULL,                     -- status|progress|log|result
            message    TEXT NOT NULL,
            data       TEXT NOT NULL                      -- JSON object
        );
        CREATE INDEX events_job ON events(job_id, id);
        CREATE TABLE validations (
            id          TEXT PRIMARY KEY,                 -- qval_<ulid>
            created_at  REAL NOT NULL,
            target      TEXT NOT NULL,
            revision    TEXT,
            ok          INTEGER NOT NULL,
            verdicts    TEXT NOT NULL,
            report      TEXT NOT NULL,
            report_html TEXT
        );
        CREATE TABLE idempotency_keys (
            key          TEXT PRIMARY KEY,
            request_hash TEXT NOT NULL,
            job_id       TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            created_at   REAL NOT NULL
        );
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    (
        2,
        """
        -- why a queued job is not running yet (set by executors that place jobs on a cluster)
        ALTER TABLE jobs ADD COLUMN queue_reason TEXT
        """,
    ),
)

SCHEMA_VERSION: int = MIGRATIONS[-1][0]
