"""The SQLite store: schema versioning, idempotency, guarded transitions, paging, recovery, retention."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from svc_helpers import session_alive

from quantgate.service.executors.recovery import kill_orphaned_group, recover
from quantgate.service.ids import new_id
from quantgate.service.migrations import SCHEMA_VERSION
from quantgate.service.store import IdempotencyConflict, OutputTaken, Store

REQUEST = {"source": "/models/x", "recipe": "nvfp4", "calibration": {}, "exclude": []}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "q.sqlite3")
    yield s
    s.close()


def make_job(store: Store, **kwargs) -> str:
    job_id = new_id("qjob")
    store.create_job(job_id=job_id, request=REQUEST, output_path=f"/out/{job_id}", **kwargs)
    return job_id


def test_schema_is_versioned_wal_and_reopenable(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    first = Store(path)
    job_id = make_job(first)
    first.close()
    again = Store(path)  # migrations are idempotent; data survives
    assert again.schema_version() == SCHEMA_VERSION
    assert again.get_job(job_id).status == "queued"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "events", "validations", "idempotency_keys", "schema_version"} <= tables
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version(version) VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer than this quantgate"):
        Store(path)


def test_ids_sort_by_creation() -> None:
    ids = [new_id("qjob") for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_idempotency_replay_and_conflict(store: Store) -> None:
    job, replayed = store.create_job(
        job_id="qjob_A", request=REQUEST, output_path="/o/a", idempotency_key="k1", request_hash="h1"
    )
    assert not replayed
    again, replayed = store.create_job(
        job_id="qjob_B", request=REQUEST, output_path="/o/b", idempotency_key="k1", request_hash="h1"
    )
    assert replayed and again.id == job.id
    assert store.get_job("qjob_B") is None
    with pytest.raises(IdempotencyConflict):
        store.create_job(
            job_id="qjob_C", request=REQUEST, output_path="/o/c", idempotency_key="k1", request_hash="other"
        )
    with pytest.raises(IdempotencyConflict):
        store.idempotent_job("k1", "other")
    assert store.idempotent_job("k1", "h1").id == job.id
    assert store.idempotent_job("unused", "h1") is None


def test_concurrent_writers_from_threads(store: Store) -> None:
    def submit(n: int) -> None:
        for i in range(25):
            store.create_job(
                job_id=new_id("qjob"),
                request=REQUEST,
                output_path=f"/o/{n}-{i}",
                idempotency_key=f"key-{i}",
                request_hash="same",
            )

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.count_by_status()["queued"] == 25  # 8 threads x 25 keys, each key created once


def test_paging_newest_first(store: Store) -> None:
    ids = [make_job(store) for _ in range(5)]
    page, has_more = store.list_jobs(limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and has_more
    page2, has_more2 = store.list_jobs(after=page[-1].id, limit=10)
    assert [j.id for j in page2] == ids[::-1][2:] and not has_more2


def test_claim_cancel_finish_are_guarded(store: Store) -> None:
    a, b = make_job(store), make_job(store)
    claimed = store.claim_next("0")
    assert claimed.id == a and claimed.status == "running" and claimed.attempts == 1
    job, stop = store.request_cancel(b)  # queued -> cancelled directly
    assert job.status == "cancelled" and not stop
    assert store.claim_next("0") is None
    job, stop = store.request_cancel(a)
    assert job.status == "cancelling" and stop
    # a finishing worker cannot overwrite a requested cancel
    assert not store.finish(a, status="succeeded", from_statuses=("running",), message="done")
    assert store.finish(a, status="cancelled", from_statuses=("cancelling",), message="stopped")
    job, stop = store.request_cancel(a)  # idempotent on terminal jobs
    assert job.status == "cancelled" and not stop
    statuses = [e.data.get("status") for e in store.list_events(a)[0] if e.type == "status"]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]


def test_events_cursor(store: Store) -> None:
    job_id = make_job(store)
    for i in range(5):
        store.record_progress(job_id, stage="quantize", fraction=i / 4, message=f"step {i}", data={"i": i})
    first, more = store.list_events(job_id, limit=3)
    assert more and len(first) == 3
    rest, more = store.list_events(job_id, after=first[-1].id, limit=10)
    assert not more and [e.data["i"] for e in rest] == [2, 3, 4]
    assert store.get_job(job_id).progress_fraction == 1.0


def test_recovery_requeues_once_then_interrupts(store: Store, tmp_path: Path) -> None:
    output = tmp_path / "out" / "job"
    output.parent.mkdir()
    job_id = new_id("qjob")
    store.create_job(job_id=job_id, request=REQUEST, output_path=str(output))
    store.claim_next("0")
    partial = output.parent / f".{output.name}.tmp-deadbeef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    report = recover(store, max_attempts=2)
    assert report.requeued == [job_id] and not partial.exists()
    job = store.get_job(job_id)
    assert job.status == "queued" and job.attempts == 1
    store.claim_next("0")  # second attempt, interrupted again
    report = recover(store, max_attempts=2)
    job = store.get_job(job_id)
    assert report.interrupted == [job_id]
    assert job.status == "failed" and job.error_code == "interrupted" and "attempt" in job.error_message


def test_recovery_kills_only_the_jobs_own_worker_group(store: Store, tmp_path: Path) -> None:
    """The recorded pid is signalled only if its command line is this job's worker; the whole group dies."""
    job_id = make_job(store)
    store.claim_next("0")
    sleeper = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    stranger = subprocess.Popen([sys.executable, "-c", sleeper], start_new_session=True)
    # The real orphan case runs end to end in test_recovery_e2e.py; here the command line mimics one.
    orphan = subprocess.Popen(
        [sys.executable, "-c", sleeper, "quantgate.service.worker", str(tmp_path / job_id / "spec.json")],
        start_new_session=True,
    )
    try:
        time.sleep(0.5)
        store.set_process(job_id, pid=stranger.pid, pgid=stranger.pid)
        assert not kill_orphaned_group(store.get_job(job_id))
        assert stranger.poll() is None, "a process that is not the job's worker is never signalled"
        store.set_process(job_id, pid=orphan.pid, pgid=orphan.pid)
        assert kill_orphaned_group(store.get_job(job_id))
        assert orphan.wait(timeout=10) == -9
        assert session_alive(orphan.pid) == [], "the worker's helpers die with it"
    finally:
        for proc in (stranger, orphan):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_retention_purges_old_finished_jobs(store: Store) -> None:
    old, running = make_job(store), make_job(store)
    store.finish(old, status="failed", from_statuses=("queued",), message="x")
    store.claim_next("0")
    assert store.purge_before(time.time() + 1) == [old]
    assert store.get_job(old) is None and store.list_events(old)[0] == []
    assert store.get_job(running) is not None


def test_two_unfinished_jobs_never_share_an_output(store: Store) -> None:
    store.create_job(job_id="qjob_A", request=REQUEST, output_path="/o/same")
    with pytest.raises(OutputTaken):
        store.create_job(job_id="qjob_B", request=REQUEST, output_path="/o/same")
    store.request_cancel("qjob_A")  # finished jobs release their output path
    store.create_job(job_id="qjob_C", request=REQUEST, output_path="/o/same")
