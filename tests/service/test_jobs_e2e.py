"""Jobs end to end: a real server, real worker processes quantizing a real tiny Gemma4 MoE.

Submit -> running -> succeeded (with events as JSON and SSE, the report as JSON and HTML), a run
cancelled mid-calibration, a worker killed with SIGKILL, an export that fails validation, and
unreadable sources; at the end, the fake HF_TOKEN appears in no response, event, log or report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from svc_helpers import (
    FAKE_HF_TOKEN,
    FAST_CALIBRATION,
    SLOW_CALIBRATION,
    ServerHandle,
    leftovers,
    session_alive,
    wait_stage,
    wait_terminal,
)

STAGES = ("plan", "calibrate", "quantize", "write", "validate", "finalize")


@dataclass
class Env:
    server: ServerHandle
    client: httpx.Client
    root: Path
    seen: list[str] = field(default_factory=list)  # every response body, for the token check

    def call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        self.seen.append(response.text)
        return response

    def submit(self, **body: object) -> dict:
        payload = {
            "source": str(self.root / "gemma4"),
            "recipe": "nvfp4",
            "calibration": FAST_CALIBRATION,
            **body,
        }
        response = self.call("POST", "/v1/jobs", json=payload)
        assert response.status_code == 201, response.text
        return response.json()

    def finished(self, job_id: str) -> dict:
        job = wait_terminal(self.client, job_id)
        self.seen.append(json.dumps(job))
        return job


@pytest.fixture(scope="module")
def env(module_launcher, tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Env:
    data = tmp_path_factory.mktemp("e2e") / "data"
    server = module_launcher(data, roots=[model_root])
    with server.client as client:
        yield Env(server=server, client=client, root=model_root)


def read_sse(env: Env, job_id: str) -> list[tuple[int, str, dict]]:
    """(id, event type, payload) of every SSE frame until the server ends the stream."""
    frames, current = [], {}
    with env.client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=240
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            env.seen.append(line)
            if not line:
                if "data" in current:
                    frames.append((int(current["id"]), current["event"], json.loads(current["data"])))
                current = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                current[key] = value
    return frames


def test_submit_run_succeed_with_events_sse_and_report(env: Env) -> None:
    job = env.submit()
    frames = read_sse(env, job["id"])  # streams from the start until the job is terminal
    statuses = [payload["data"]["status"] for _, kind, payload in frames if kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    stages = [payload["data"]["stage"] for _, kind, payload in frames if kind == "progress"]
    assert [s for s in STAGES if s in stages] == list(dict.fromkeys(stages)) and "quantize" in stages
    ids = [frame_id for frame_id, _, _ in frames]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    done = env.finished(job["id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["attempts"] == 1
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert done["progress"] == {"stage": "finalize", "fraction": 1.0}
    output = Path(done["output_path"])
    assert output == env.server.data_dir.resolve() / "outputs" / job["id"]
    assert (output / "hf_quant_config.json").is_file() and list(output.glob("*.safetensors"))
    assert leftovers(output) == [output], "no temp or failed directories next to the output"
    assert done["validation"]["ok"] is True and done["validation"]["errors"] == 0
    assert {v["status"] for v in done["validation"]["verdicts"].values()} == {"loads"}

    events = env.call("GET", f"/v1/jobs/{job['id']}/events", params={"limit": 2}).json()
    assert events["has_more"] and [e["id"] for e in events["data"]] == ids[:2]
    rest = env.call("GET", f"/v1/jobs/{job['id']}/events", params={"after": ids[1], "limit": 1000}).json()
    assert [e["id"] for e in rest["data"]] == ids[2:] and not rest["has_more"]

    report = env.call("GET", f"/v1/jobs/{job['id']}/report")
    assert report.headers["content-type"] == "application/json"
    assert report.json()["verdicts"] == done["validation"]["verdicts"]
    assert report.json() == json.loads((output / "quantgate-report.json").read_text())
    html = env.call(
        "GET", f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html,application/xhtml+xml"}
    )
    assert html.headers["content-type"].startswith("text/html") and "<html" in html.text.lower()
    listed = env.call("GET", "/v1/jobs").json()["data"]
    assert listed[0]["id"] == job["id"]
    index = env.call("GET", "/").text
    assert f'href="/v1/jobs/{job["id"]}/report"' in index
    metrics = env.call("GET", "/metrics").text
    assert 'quantgate_job_duration_seconds_count{status="succeeded"} 1.0' in metrics


def test_cancel_a_running_job(env: Env) -> None:
    job = env.submit(calibration=SLOW_CALIBRATION)
    running = wait_stage(env.client, job["id"], "calibrate")
    assert running["status"] == "running"
    pid, pgid = env.server.job_process(job["id"])
    assert pid and pgid and session_alive(pgid)
    worker_env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={FAKE_HF_TOKEN}".encode() in worker_env, "the worker gets HF_TOKEN in its environment"
    assert b"CUDA_VISIBLE_DEVICES=" in worker_env  # the CPU slot hides every GPU
    assert FAKE_HF_TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

    response = env.call("POST", f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] in ("cancelling", "cancelled")
    done = env.finished(job["id"])
    assert done["status"] == "cancelled" and done["output_path"] is None
    assert session_alive(pgid) == [], "the worker's process group is gone"
    output = env.server.data_dir.resolve() / "outputs" / job["id"]
    assert leftovers(output) == [], "no output, no partial output"
    statuses = [
        e["data"]["status"]
        for e in env.call("GET", f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        if e["type"] == "status"
    ]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]
    assert env.call("POST", f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_sigkilled_worker_fails_the_job_and_the_next_job_runs(env: Env) -> None:
    job = env.submit(calibration=SLOW_CALIBRATION)
    wait_stage(env.client, job["id"], "calibrate")
    pid, pgid = env.server.job_process(job["id"])
    os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
    done = env.finished(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "worker_killed"
    assert done["error"]["message"].startswith("worker killed by SIGKILL (out of memory?)")
    assert session_alive(pgid) == []
    assert leftovers(env.server.data_dir.resolve() / "outputs" / job["id"]) == []
    after = env.finished(env.submit()["id"])
    assert after["status"] == "succeeded", after
    assert env.call("GET", "/readyz").status_code == 200


def test_export_failing_validation_ends_failed_with_report(env: Env) -> None:
    # A source whose config.json claims one more decoder layer than its weights hold (a pruned or
    # truncated checkpoint with a stale config): transformers silently initializes the missing layer,
    # the export goes through, and the validator must refuse it (an engine would fail to load it).
    stale = env.root / "gemma4-stale-config"
    if not stale.exists():
        shutil.copytree(env.root / "gemma4", stale)
        config = json.loads((stale / "config.json").read_text())
        config["num_hidden_layers"] += 1
        if config.get("layer_types"):
            config["layer_types"].append(config["layer_types"][-1])
        (stale / "config.json").write_text(json.dumps(config, indent=2))
    job = env.submit(source=str(stale))
    done = env.finished(job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "validation_failed", done
    assert done["output_path"] is None
    kept = Path(done["failed_output_path"])
    assert kept.name.endswith(".failed-validation") and (kept / "quantgate-report.json").is_file()
    assert done["validation"]["ok"] is False and done["validation"]["errors"] > 0
    report = env.call("GET", f"/v1/jobs/{job['id']}/report").json()
    assert report == json.loads((kept / "quantgate-report.json").read_text())
    assert "QG611" in {finding["code"] for finding in report["findings"] if finding["severity"] == "error"}
    html = env.call("GET", f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html") and "QG611" in html.text
    output = env.server.data_dir.resolve() / "outputs" / job["id"]
    assert leftovers(output) == [kept], "the final path was never written"


def test_unreadable_sources_are_refused_with_a_clear_message(
    env: Env, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Refused at submit time now (422); the worker's own check of the same sources:
    tests/service/test_submit_checks.py."""
    payload = {"recipe": "nvfp4", "calibration": FAST_CALIBRATION}
    missing = env.call("POST", "/v1/jobs", json={**payload, "source": str(env.root / "no-such-model")})
    assert missing.status_code == 422
    assert "no-such-model" in missing.json()["detail"] and "Traceback" not in missing.text
    corrupt = env.root / "corrupt-model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((env.root / "gemma4" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    broken = env.call("POST", "/v1/jobs", json={**payload, "source": str(corrupt)})
    assert broken.status_code == 422 and "model.safetensors" in broken.json()["detail"]
    assert env.call("GET", "/readyz").status_code == 200


def test_the_hf_token_is_never_echoed(env: Env) -> None:
    """Every response seen above, every event, the server log, worker logs, reports and the store."""
    jobs = env.call("GET", "/v1/jobs", params={"limit": 100}).json()["data"]
    for job in jobs:
        env.call("GET", f"/v1/jobs/{job['id']}/events", params={"limit": 1000})
        env.call("GET", f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"})
    env.call("GET", "/metrics")
    env.call("GET", "/")
    assert not [text for text in env.seen if FAKE_HF_TOKEN in text]
    files = [env.server.log_path, *env.server.data_dir.rglob("*")]
    leaked = [path for path in files if path.is_file() and FAKE_HF_TOKEN.encode() in path.read_bytes()]
    assert leaked == []
    started = [job for job in jobs if job["attempts"] > 0]
    assert started and len(list(env.server.data_dir.rglob("worker.log"))) == len(started)
