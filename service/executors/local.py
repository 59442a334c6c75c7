"""The local executor: a dispatcher thread hands queued jobs to free slots (GPUs, or one CPU slot),
each job runs as `python -m quantgate.service.worker SPEC` in its own process group with
`CUDA_VISIBLE_DEVICES` set to its slot, and a monitor thread per job relays the worker's JSON
lines into the store and settles the job when the process exits.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from quantgate.service.executors.base import DispatchingExecutor, SlotUsage
from quantgate.service.executors.outcome import interpret
from quantgate.service.executors.process import WorkerProcess
from quantgate.service.executors.recovery import recover
from quantgate.service.executors.relay import SPEC_FILE, EventRelay, fail_job, settle, write_spec
from quantgate.service.settings import Settings
from quantgate.service.store import JobRecord, Store

__all__ = ["CPU_SLOT", "LocalExecutor", "detect_devices", "worker_env"]

logger = logging.getLogger(__name__)

CPU_SLOT = "cpu"
SECRET_ENV_PREFIXES = ("QUANTGATE_",)  # server configuration (API tokens) never reaches a worker


def detect_devices(configured: list[str] | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Slots: configured ids, else CUDA_VISIBLE_DEVICES, else `nvidia-smi -L` UUIDs, else one CPU slot.

    Never initializes CUDA in the server process.
    """
    if configured:
        return tuple(configured)
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [item.strip() for item in visible.split(",") if item.strip()]
        valid = list(itertools.takewhile(lambda item: not item.startswith("-"), ids))  # CUDA stops at "-1"
        return tuple(valid) or (CPU_SLOT,)
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return (CPU_SLOT,)
    uuids = [
        line.split("UUID:")[1].strip(" )")
        for line in listing.stdout.splitlines()
        if line.startswith("GPU ") and "UUID:" in line
    ]
    return tuple(uuids) or (CPU_SLOT,)


def worker_env(base: Mapping[str, str], *, device: str, hf_token: str | None) -> dict[str, str]:
    """The worker's environment: the server's minus its own config, one device, HF_TOKEN if set."""
    env = {key: value for key, value in base.items() if not key.startswith(SECRET_ENV_PREFIXES)}
    env["CUDA_VISIBLE_DEVICES"] = "" if device == CPU_SLOT else device
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("HF_TOKEN", None)
    if hf_token:
        env["HF_TOKEN"] = hf_token
    return env


@dataclass
class _Run:
    job: JobRecord
    device: str
    process: WorkerProcess
    job_dir: Path
    relay: EventRelay
    monitor: threading.Thread | None = None
    returncode: int | None = None


class LocalExecutor(DispatchingExecutor):
    """Worker processes on this host, one per slot at most."""

    def __init__(self, settings: Settings, store: Store, **kwargs: Any) -> None:
        super().__init__(settings, store, **kwargs)
        self.devices = detect_devices(settings.gpu_slots, self.environ)
        wanted = len(self.devices) if settings.max_concurrency is None else settings.max_concurrency
        self.concurrency = min(len(self.devices), wanted)
        self._free: list[str] = list(self.devices)
        self._runs: dict[str, _Run] = {}
        self._secrets = tuple(
            s
            for s in [
                settings.hf_token.get_secret_value() if settings.hf_token else None,
                *(t.get_secret_value() for t in settings.api_tokens),
            ]
            if s
        )

    # -- Executor ---------------------------------------------------------------------------------
    def start(self) -> None:
        recover(self.store, max_attempts=self.settings.max_attempts)
        self._start_dispatcher()
        logger.info(
            "local executor: %d slot(s) %s, concurrency %d",
            len(self.devices),
            list(self.devices),
            self.concurrency,
        )

    def stop(self) -> None:
        self._stop_dispatcher()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.process.terminate(self.settings.cancel_grace_seconds)
        for run in runs:
            if run.monitor is not None:
                run.monitor.join(timeout=self.settings.cancel_grace_seconds + 30)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            run.process.terminate(self.settings.cancel_grace_seconds)

    def slots(self) -> SlotUsage:
        with self._lock:
            return SlotUsage(
                total=len(self.devices),
                in_use=len(self._runs),
                concurrency=self.concurrency,
                devices=self.devices,
            )

    # -- dispatching ------------------------------------------------------------------------------
    def _dispatch_round(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if len(self._runs) >= self.concurrency or not self._free:
                    return
                device = self._free.pop(0)
                job = self.store.claim_next(device)
                if job is None:
                    self._free.insert(0, device)
                    return
                try:
                    run = self._launch(job, device)
                except Exception as exc:  # noqa: BLE001 - reported on the job, slot returned
                    self._free.insert(0, device)
                    logger.exception("job %s: could not start its worker", job.id)
                    fail_job(
                        self.store,
                        job.id,
                        error_code="launch_failed",
                        message=f"could not start the worker process: {exc}",
                        from_statuses=("running", "cancelling"),
                    )
                    continue
                self._runs[job.id] = run
                run.monitor = threading.Thread(
                    target=self._monitor, args=(run,), name=f"job-{job.id}", daemon=True
                )
            run.monitor.start()

    def _launch(self, job: JobRecord, device: str) -> _Run:
        job_dir = self.settings.jobs_dir / job.id
        write_spec(job_dir, job, job_dir=str(job_dir))
        spec_path = job_dir / SPEC_FILE
        log_path = job_dir / "worker.log"
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(
                f"--- attempt {job.attempts} on slot {device} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
            )
        hf_token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        process = WorkerProcess(
            [self.settings.worker_python, "-m", "quantgate.service.worker", str(spec_path)],
            env=worker_env(self.environ, device=device, hf_token=hf_token),
            log_path=log_path,
            secrets=self._secrets,
            cwd=job_dir,
        )
        self.store.set_process(job.id, pid=process.pid, pgid=process.pgid)
        if self.store.get_job(job.id).status == "cancelling":  # cancelled between claim and launch
            process.terminate(self.settings.cancel_grace_seconds)
        logger.info("job %s: worker pid %d on slot %s", job.id, process.pid, device)
        return _Run(
            job=job, device=device, process=process, job_dir=job_dir, relay=EventRelay(self.store, job.id)
        )

    # -- one run ----------------------------------------------------------------------------------
    def _monitor(self, run: _Run) -> None:
        def wait() -> None:
            run.returncode = run.process.wait()

        waiter = threading.Thread(target=wait, name=f"wait-{run.job.id}", daemon=True)
        waiter.start()
        try:
            for line in run.process.lines():
                run.relay.feed(line)
            run.relay.flush()
        except Exception:  # noqa: BLE001 - a broken relay must not strand the job
            logger.exception("job %s: relaying worker output failed", run.job.id)
        waiter.join()
        try:
            self._settle(run)
        except Exception:  # noqa: BLE001
            logger.exception("job %s: settling failed", run.job.id)
        finally:
            with self._lock:
                self._runs.pop(run.job.id, None)
                self._free.append(run.device)
            self._wake.set()

    def _settle(self, run: _Run) -> None:
        assert run.returncode is not None
        relay = run.relay
        html_path = run.job_dir / "report.html"
        html = html_path.read_text(encoding="utf-8") if relay.result and html_path.exists() else None
        outcome = interpret(run.returncode, relay.result, relay.error, list(run.process.stderr_tail), html)
        settle(self.store, run.job, outcome, stopping=self._stopping.is_set(), notify=self._notify)
