"""The job service on a real Ray cluster: a Ray head (2 CPUs, no GPU) and `quantgate serve
--executor ray` inside a private network namespace, real workers quantizing the tiny Gemma4 MoE.

Submit -> progress events -> succeeded with a validated export; two jobs at once on two slots
and a third queued until a cancel frees one; a killed Ray worker retried once; a job asking for
more GPUs than any node has stays queued with the reason, then fails after the timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray_netns import Namespace, RayServer, start_ray_server
from svc_helpers import (
    FAKE_HF_TOKEN,
    FAST_CALIBRATION,
    SLOW_CALIBRATION,
    leftovers,
    session_alive,
    wait_for,
    wait_stage,
    wait_terminal,
)

UNSCHEDULABLE_TIMEOUT_S = 8
#: calibrates for a few seconds: long enough to kill mid-run, short enough to rerun
MEDIUM_CALIBRATION = {"data": "random", "samples": 150, "seq_len": 64, "batch_size": 1}


@dataclass
class Env:
    server: RayServer
    client: httpx.Client
    root: Path

    def submit(self, **body: Any) -> dict[str, Any]:
        payload = {"source": str(self.root / "gemma4"), "recipe": "nvfp4", "gpus": 0, **body}
        payload.setdefault("calibration", FAST_CALIBRATION)
        response = self.client.post("/v1/jobs", json=payload)
        assert response.status_code == 201, response.text
        return response.json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]

    def statuses(self, job_id: str) -> list[str]:
        return [
            e["data"]["status"]
            for e in self.events(job_id)
            if e["type"] == "status" and "reason" not in e["data"]
        ]

    def output(self, job_id: str) -> Path:
        return self.server.data_dir.resolve() / "outputs" / job_id

    def cluster(self) -> dict[str, Any]:
        return self.client.get("/readyz").json()["cluster"]


@pytest.fixture(scope="module")
def env(
    ray_namespace: Namespace, tmp_path_factory: pytest.TempPathFactory, ray_model_root: Path
) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ray-e2e")
    server = start_ray_server(
        ray_namespace,
        tmp / "data",
        tmp,
        roots=[ray_model_root],
        args=["--max-attempts", "2", "--unschedulable-timeout-seconds", str(UNSCHEDULABLE_TIMEOUT_S)],
    )
    try:
        with server.client as client:
            yield Env(server=server, client=client, root=ray_model_root)
    finally:
        server.stop()
        assert FAKE_HF_TOKEN not in server.log_text()


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_job_runs_on_ray_and_succeeds_with_a_validated_export(env: Env) -> None:
    ready = env.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["cluster_reachable"] is True
    cluster = ready.json()["cluster"]
    assert (cluster["reachable"], cluster["nodes"], cluster["gpus_total"], cluster["cpus_total"]) == (
        True,
        1,
        0,
        2,
    )
    metrics = env.client.get("/metrics").text
    for line in (
        "quantgate_cluster_reachable 1.0",
        "quantgate_cluster_gpus 0.0",
        "quantgate_cluster_gpus_free 0.0",
    ):
        assert line in metrics

    job = env.submit()
    assert job["gpus"] == 0 and job["status"] == "queued"
    done = wait_terminal(env.client, job["id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["attempts"] == 1, done
    assert done["progress"] == {"stage": "finalize", "fraction": 1.0}
    output = Path(done["output_path"])
    assert output == env.output(job["id"]) and (output / "hf_quant_config.json").is_file()
    assert list(output.glob("*.safetensors")) and leftovers(output) == [output]
    assert done["validation"]["ok"] is True and done["validation"]["errors"] == 0
    assert {v["status"] for v in done["validation"]["verdicts"].values()} == {"loads"}

    events = env.events(job["id"])
    assert env.statuses(job["id"]) == ["queued", "running", "succeeded"]
    stages = list(dict.fromkeys(e["data"]["stage"] for e in events if e["type"] == "progress"))
    assert stages[0] == "plan" and "calibrate" in stages and "quantize" in stages and stages[-1] == "finalize"
    placed = [e for e in events if e["type"] == "log" and "started on Ray node 127.0.0.1" in e["message"]]
    assert len(placed) == 1 and placed[0]["data"]["devices"] == "cpu"
    report = env.client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report == json.loads((output / "quantgate-report.json").read_text())
    html = env.client.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html") and "<html" in html.text.lower()
    worker_log = (env.server.data_dir / "jobs" / job["id"] / "worker.log").read_text()
    assert "--- attempt 1 on Ray node" in worker_log and "quantgate.service.worker" in worker_log
    assert FAKE_HF_TOKEN not in json.dumps(events) + worker_log
    assert 'quantgate_job_duration_seconds_count{status="succeeded"} 1.0' in env.client.get("/metrics").text


def test_two_slots_run_two_jobs_and_a_third_queues_until_a_cancel_frees_one(env: Env) -> None:
    first, second, third = (env.submit(calibration=SLOW_CALIBRATION) for _ in range(3))
    wait_stage(env.client, first["id"], "calibrate")
    wait_stage(env.client, second["id"], "calibrate")
    assert env.client.get(f"/v1/jobs/{first['id']}").json()["status"] == "running", "both run at once"
    waiting = env.client.get(f"/v1/jobs/{third['id']}").json()
    assert waiting["status"] == "queued", waiting
    assert waiting["queue_reason"].startswith(
        "waiting for free resources: the job needs 0 GPU(s) and 1 CPU(s)"
    )
    assert env.client.get("/readyz").json()["slots"] == {"total": 2, "in_use": 2, "concurrency": 2}
    wait_for(env.client, third["id"], lambda _: env.cluster()["cpus_free"] == 0, timeout=30)

    pid, pgid = env.server.job_process(first["id"])
    assert pid and pgid and session_alive(pgid)
    worker_environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert (
        f"HF_TOKEN={FAKE_HF_TOKEN}".encode() in worker_environ and b"CUDA_VISIBLE_DEVICES=" in worker_environ
    )
    assert env.client.post(f"/v1/jobs/{first['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
    cancelled = wait_terminal(env.client, first["id"], timeout=60)
    assert cancelled["status"] == "cancelled" and cancelled["output_path"] is None
    assert session_alive(pgid) == [], "the worker's process group is gone from the node"
    assert leftovers(env.output(first["id"])) == []
    assert env.statuses(first["id"]) == ["queued", "running", "cancelling", "cancelled"]

    started = wait_for(env.client, third["id"], lambda job: job["status"] != "queued", timeout=60)
    assert started["status"] == "running" and started["queue_reason"] is None, (
        "the freed slot runs the third job"
    )
    for job in (second, third):
        env.client.post(f"/v1/jobs/{job['id']}/cancel")
    for job in (second, third):
        assert wait_terminal(env.client, job["id"], timeout=60)["status"] == "cancelled"
    # Ray has every CPU back: the actors were killed, not left to be collected
    wait_for(env.client, third["id"], lambda _: env.cluster()["cpus_free"] == 2, timeout=30)
    assert env.client.get("/readyz").json()["slots"]["in_use"] == 0


def test_killed_ray_worker_is_retried_once_and_never_runs_twice(env: Env) -> None:
    job = env.submit(calibration=MEDIUM_CALIBRATION)
    wait_stage(env.client, job["id"], "calibrate")
    pid, pgid = env.server.job_process(job["id"])
    actor_pid = _parent_pid(pid)
    assert b"JobRunner" in Path(f"/proc/{actor_pid}/cmdline").read_bytes(), "the worker's parent is the actor"
    os.kill(actor_pid, signal.SIGKILL)  # the Ray worker process dies mid-job (OOM killer, node lost)

    retried = wait_for(
        env.client, job["id"], lambda j: j["attempts"] == 2 or j["status"] in ("failed",), timeout=60
    )
    assert retried["attempts"] == 2, retried
    assert session_alive(pgid) == [], "the first run's worker died with its actor"
    done = wait_terminal(env.client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert env.statuses(job["id"]) == ["queued", "running", "queued", "running", "succeeded"]
    lost = [
        e["message"] for e in env.events(job["id"]) if e["type"] == "status" and "was lost" in e["message"]
    ]
    assert len(lost) == 1 and "the Ray worker running this job was lost" in lost[0]
    assert lost[0].endswith("requeued (attempt 1 of 2)")
    assert leftovers(Path(done["output_path"])) == [Path(done["output_path"])]


def test_job_needing_more_gpus_than_the_cluster_has_stays_queued_then_fails(env: Env) -> None:
    big = env.submit(gpus=2)
    queued = wait_for(env.client, big["id"], lambda job: job["queue_reason"] is not None, timeout=30)
    assert queued["status"] == "queued" and queued["gpus"] == 2
    assert queued["queue_reason"].startswith(
        "unschedulable: the job needs 2 GPU(s) on one node, but the largest node of the Ray cluster has 0"
    )
    small = env.submit()  # not stuck behind it
    assert wait_for(env.client, small["id"], lambda job: job["status"] != "queued", timeout=30)["status"] in (
        "running",
        "succeeded",
    )
    failed = wait_terminal(env.client, big["id"], timeout=UNSCHEDULABLE_TIMEOUT_S + 30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "unschedulable", failed
    assert f"gave up after {UNSCHEDULABLE_TIMEOUT_S}s" in failed["error"]["message"]
    assert failed["finished_at"] - failed["created_at"] >= UNSCHEDULABLE_TIMEOUT_S
    assert failed["attempts"] == 0 and failed["started_at"] is None
    assert wait_terminal(env.client, small["id"])["status"] == "succeeded"
    assert env.client.get("/readyz").status_code == 200


def test_a_crashed_server_leaves_no_worker_running_and_the_next_server_retries(
    ray_namespace: Namespace, tmp_path_factory: pytest.TempPathFactory, ray_model_root: Path
) -> None:
    tmp = tmp_path_factory.mktemp("ray-crash")
    args = ["--max-attempts", "2"]
    server = start_ray_server(ray_namespace, tmp / "data", tmp, roots=[ray_model_root], args=args, port=8001)
    try:
        with server.client as client:
            job = Env(server=server, client=client, root=ray_model_root).submit(
                calibration=MEDIUM_CALIBRATION
            )
            wait_stage(client, job["id"], "calibrate")
        pid, pgid = server.job_process(job["id"])
        assert pid and pgid and session_alive(pgid)
    finally:
        server.stop(signal.SIGKILL)  # the service dies; its Ray actors die with their owner
    deadline = time.monotonic() + 30
    while session_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_alive(pgid) == [], "the orphaned worker died with its actor, before any restart"

    again = start_ray_server(ray_namespace, tmp / "data", tmp, roots=[ray_model_root], args=args, port=8001)
    try:
        with again.client as client:
            done = wait_terminal(client, job["id"])
            assert done["status"] == "succeeded" and done["attempts"] == 2, done
            events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        requeued = [e["message"] for e in events if e["type"] == "status" and e["data"]["status"] == "queued"]
        assert any(
            "the server stopped while this job was running (attempt 1 of 2); requeued" in m for m in requeued
        )
        assert leftovers(Path(done["output_path"])) == [Path(done["output_path"])]
    finally:
        again.stop()


def test_an_unreachable_ray_address_is_a_clear_start_up_error(
    ray_namespace: Namespace, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "quantgate.service.cli", "serve", "--executor", "ray", "--data-dir", str(tmp_path)]
    result = subprocess.run(
        ray_namespace.exec_argv([*argv, "--ray-address", "127.0.0.1:9"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "quantgate serve: cannot reach the Ray cluster at 127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
