"""Helpers shared by the service tests: server processes, polling, process inspection, constants."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from quantgate.service import launch
from quantgate.service.launch import free_port

#: A fake Hub token: the tests grep every response, event, log and report for it.
FAKE_HF_TOKEN = "hf_TESTtokenNEVERshownANYWHERE0123456789"
API_TOKEN = "qg-test-token-0123456789abcdef"
#: Small calibration: a tiny-model job finishes in seconds on 2 cores.
FAST_CALIBRATION = {"data": "random", "samples": 4, "seq_len": 32, "batch_size": 2}
#: A real job that takes minutes (many calibration batches): for the cancel and kill tests.
SLOW_CALIBRATION = {"data": "random", "samples": 20_000, "seq_len": 64, "batch_size": 1}
TERMINAL = {"succeeded", "failed", "cancelled"}
READY_TIMEOUT_S = launch.READY_TIMEOUT_S
JOB_TIMEOUT_S = 240.0


@dataclass
class ServerHandle:
    """One `quantgate serve` process."""

    proc: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30.0)

    def db(self) -> sqlite3.Connection:
        """A read-only look at the server's store (WAL allows a concurrent reader)."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'quantgate.sqlite3'}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def job_process(self, job_id: str) -> tuple[int | None, int | None]:
        with self.db() as conn:
            row = conn.execute("SELECT pid, pgid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row["pid"], row["pgid"]) if row else (None, None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        return launch.stop_server(self.proc, sig, timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def wait_ready(handle: ServerHandle, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the server answers /readyz; a test failure with its log if it exits or times out."""
    try:
        with handle.client as client:
            launch.wait_ready(handle.proc, client, timeout=timeout)
    except launch.ServerNotReady as exc:
        raise AssertionError(f"{exc}:\n{handle.log_text()}") from None


class Launcher:
    """Starts `quantgate serve` processes and stops them all at teardown."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.started: list[ServerHandle] = []

    def __call__(
        self,
        data_dir: Path,
        *,
        roots: Sequence[Path] = (),
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        token: str | None = None,
        wait: bool = True,
    ) -> ServerHandle:
        """A server on a free loopback port with `data_dir`, `roots`, the fake HF_TOKEN and `token`."""
        port = free_port()
        log_path = self.tmp_path_factory.mktemp("server-logs") / "server.log"
        command = launch.serve_command(
            data_dir,
            port,
            roots=roots,
            args=["--cancel-grace-seconds", "3", "--log-level", "info", *args],
        )
        full_env = {key: value for key, value in os.environ.items() if not key.startswith("QUANTGATE_")}
        full_env.update({"HF_TOKEN": FAKE_HF_TOKEN, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        if token:
            full_env["QUANTGATE_API_TOKENS"] = token
        full_env.update(env or {})
        proc = launch.start_server(command, log_path, env=full_env, new_session=True)
        handle = ServerHandle(
            proc=proc,
            base_url=f"http://127.0.0.1:{port}",
            data_dir=data_dir,
            log_path=log_path,
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
        self.started.append(handle)
        if wait:
            wait_ready(handle)
        return handle

    def stop_all(self) -> None:
        for handle in self.started:
            handle.stop()


def wait_for(
    client: httpx.Client,
    job_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = JOB_TIMEOUT_S,
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until `predicate(job)`; fails with the job's events on timeout."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.1)
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()
    raise AssertionError(f"timed out waiting on {job_id}: {job}\nevents: {events}")


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    return wait_for(client, job_id, lambda job: job["status"] in TERMINAL, timeout)


def wait_stage(
    client: httpx.Client, job_id: str, stage: str, timeout: float = JOB_TIMEOUT_S
) -> dict[str, Any]:
    """Until the job reports progress in `stage` with some work done (or has ended)."""
    return wait_for(
        client,
        job_id,
        lambda job: (
            job["status"] in TERMINAL
            or (
                (job.get("progress") or {}).get("stage") == stage
                and ((job["progress"] or {}).get("fraction") or 0) > 0
            )
        ),
        timeout,
    )


def session_alive(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid` (a worker's group and session)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def leftovers(output: Path) -> list[Path]:
    """Anything the job left at or next to its output path."""
    return sorted(
        p
        for p in output.parent.iterdir()
        if p.name == output.name or p.name.startswith((f".{output.name}.", f"{output.name}."))
    )
