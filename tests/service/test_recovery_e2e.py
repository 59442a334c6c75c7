"""Durability end to end: the server is SIGKILLed (or stopped) mid-job and started again on the same
data dir. Jobs are requeued once, then failed as `interrupted`; nothing is lost, nothing runs
twice, and no half-written output ever sits at a final path."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from svc_helpers import FAST_CALIBRATION, leftovers, session_alive, wait_stage, wait_terminal

#: Long enough to be caught mid-calibration, short enough to finish when requeued (~10 s on 2 cores).
MEDIUM_CALIBRATION = {"data": "random", "samples": 24, "seq_len": 64, "batch_size": 1}


def submit(client, root: Path, calibration: dict) -> str:
    response = client.post(
        "/v1/jobs", json={"source": str(root / "gemma4"), "recipe": "nvfp4", "calibration": calibration}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def events_of(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def test_server_sigkill_mid_job_then_restart_requeues_and_completes(
    start_server, tmp_path: Path, model_root: Path
) -> None:
    data = tmp_path / "data"
    first = start_server(data, roots=[model_root])
    with first.client as client:
        earlier = submit(client, model_root, FAST_CALIBRATION)
        assert wait_terminal(client, earlier)["status"] == "succeeded"
        victim = submit(client, model_root, MEDIUM_CALIBRATION)
        queued_behind = submit(client, model_root, FAST_CALIBRATION)
        wait_stage(client, victim, "calibrate")
    _, pgid = first.job_process(victim)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    output = data.resolve() / "outputs" / victim
    assert not output.exists(), "nothing at the final path while the job was unfinished"

    second = start_server(data, roots=[model_root])
    assert session_alive(pgid) == [], "the first run's worker is gone before anything is dispatched"
    with second.client as client:
        done = wait_terminal(client, victim)
        assert done["status"] == "succeeded" and done["attempts"] == 2
        messages = [e["message"] for e in events_of(client, victim) if e["type"] == "status"]
        assert any("requeued" in message for message in messages)
        assert wait_terminal(client, queued_behind)["status"] == "succeeded"
        jobs = {job["id"]: job for job in client.get("/v1/jobs").json()["data"]}
        assert set(jobs) == {earlier, victim, queued_behind}, "no job disappeared"
        assert jobs[earlier]["status"] == "succeeded" and jobs[earlier]["attempts"] == 1
    assert leftovers(output) == [output], "the interrupted attempt's temp output was removed"
    assert Path(done["output_path"]) == output and (output / "hf_quant_config.json").is_file()


def test_a_job_interrupted_on_its_last_attempt_fails_as_interrupted(
    start_server, tmp_path: Path, model_root: Path
) -> None:
    data = tmp_path / "data"
    first = start_server(data, roots=[model_root], args=["--max-attempts", "1"])
    with first.client as client:
        victim = submit(client, model_root, MEDIUM_CALIBRATION)
        wait_stage(client, victim, "calibrate")
    first.stop(signal.SIGKILL)
    second = start_server(data, roots=[model_root], args=["--max-attempts", "1"])
    with second.client as client:
        done = client.get(f"/v1/jobs/{victim}").json()
        assert done["status"] == "failed" and done["error"]["code"] == "interrupted"
        assert "all 1 attempt(s)" in done["error"]["message"]
    assert leftovers(data.resolve() / "outputs" / victim) == []


def test_graceful_shutdown_requeues_without_using_an_attempt(
    start_server, tmp_path: Path, model_root: Path
) -> None:
    data = tmp_path / "data"
    first = start_server(data, roots=[model_root], args=["--max-attempts", "1"])
    with first.client as client:
        job = submit(client, model_root, MEDIUM_CALIBRATION)
        wait_stage(client, job, "calibrate")
    _, pgid = first.job_process(job)
    assert first.stop(signal.SIGTERM) == 0
    assert session_alive(pgid) == []
    with first.db() as conn:
        row = conn.execute("SELECT status, attempts FROM jobs WHERE id = ?", (job,)).fetchone()
    assert (row["status"], row["attempts"]) == ("queued", 0)
    second = start_server(data, roots=[model_root], args=["--max-attempts", "1"])
    with second.client as client:
        assert wait_terminal(client, job)["status"] == "succeeded"


def test_one_server_per_data_dir(start_server, tmp_path: Path) -> None:
    data = tmp_path / "data"
    start_server(data)
    second = start_server(data, wait=False)
    assert second.proc.wait(timeout=60) == 2
    assert "another quantgate server is using" in second.log_text()
    assert "Traceback" not in second.log_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_refuses_to_listen_beyond_loopback_without_tokens(start_server, tmp_path: Path, host: str) -> None:
    server = start_server(tmp_path / "data", args=["--host", host], wait=False)
    assert server.proc.wait(timeout=60) == 2
    assert "without API tokens" in server.log_text() and "Traceback" not in server.log_text()
