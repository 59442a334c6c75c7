"""The node side of a Ray job: `JobRunner`, an actor that runs one job's worker on its Ray node.

The service creates one actor per run with `num_gpus` = the job's GPUs (Ray sets the devices), then
streams `run()`: the actor launches the same entry point as the local executor, `python -m
service.worker SPEC`, in its own process group (`WorkerProcess`), and yields

- `{"kind": "started", node_id, node_ip, pid, pgid, actor_pid, devices}` once the worker runs,
- `{"kind": "line", "line": ...}` for every line of the worker's JSON-lines protocol,
- `{"kind": "exit", returncode, stderr_tail, report_html, log_tail}` when it has exited.

`stop(grace)` (callable while `run()` streams: the actor has two threads) sends the group SIGTERM
and SIGKILL after `grace`. If the actor's process dies (killed, node lost) the kernel kills the
worker with it (`die_with_parent`), and the service kills any rest of the group on the node with
`kill_orphaned_group` before it retries the job. This module imports ray only inside `run()`, and
only on the node.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantgate.service.executors.local import CPU_SLOT, worker_env
from quantgate.service.executors.process import WorkerProcess

__all__ = ["LOG_TAIL_BYTES", "JobRunner", "read_tail"]

logger = logging.getLogger(__name__)

LOG_TAIL_BYTES = 256 * 1024  # the worker's stderr log sent back to the service's job dir
WORKDIR_PREFIX = "quantgate-"  # node-local spec and log dir; names the job id (recovery checks it)


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last `limit` bytes of a text file ("" when missing)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


class JobRunner:
    """One run of one job on a Ray node (wrapped with `ray.remote` by the executor)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._lock = threading.Lock()
        self._stop_requested = False
        self._process: WorkerProcess | None = None

    def run(self, spec: dict[str, Any], hf_token: str | None) -> Iterator[dict[str, Any]]:
        """Run the worker for `spec` and stream its protocol lines (see the module docstring)."""
        import ray

        workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{self.job_id}-"))
        process: WorkerProcess | None = None
        try:
            spec_path = workdir / "spec.json"
            spec_path.write_text(json.dumps({**spec, "job_dir": str(workdir)}, indent=2), encoding="utf-8")
            device = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or CPU_SLOT
            log_path = workdir / "worker.log"
            with self._lock:
                if self._stop_requested:
                    yield {"kind": "exit", "returncode": -15, "stderr_tail": [], "report_html": None}
                    return
                process = WorkerProcess(
                    [sys.executable, "-m", "quantgate.service.worker", str(spec_path)],
                    env=worker_env(os.environ, device=device, hf_token=hf_token),
                    log_path=log_path,
                    secrets=(hf_token,) if hf_token else (),
                    cwd=workdir,
                    die_with_parent=True,
                )
                self._process = process
            yield {
                "kind": "started",
                "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "pid": process.pid,
                "pgid": process.pgid,
                "actor_pid": os.getpid(),
                "devices": device,
            }
            for line in process.lines():
                yield {"kind": "line", "line": line}
            returncode = process.wait()
            html_path = workdir / "report.html"
            yield {
                "kind": "exit",
                "returncode": returncode,
                "stderr_tail": list(process.stderr_tail),
                "report_html": html_path.read_text(encoding="utf-8") if html_path.exists() else None,
                "log_tail": read_tail(log_path),
            }
        finally:
            if process is not None:
                process.kill()  # no-op once reaped; otherwise the stream was abandoned mid-run
            shutil.rmtree(workdir, ignore_errors=True)

    def stop(self, grace_seconds: float) -> bool:
        """SIGTERM the worker's group, SIGKILL after `grace_seconds`; False if it never started."""
        with self._lock:
            self._stop_requested = True
            process = self._process
        if process is not None:
            process.terminate(grace_seconds)
        return process is not None
