"""Jobs with `push_to_hub`: a real server and real workers push to a local fake Hub (127.0.0.1).

The job's events show the upload, the job record and its report (JSON and HTML) link the repo and
the commit, a rejected token fails the job with `push_rejected` (the validated export is kept), a
retried run of the same job does not make a second commit, and the server's HF_TOKEN appears in
no response, event, log or report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from svc_helpers import FAKE_HF_TOKEN, FAST_CALIBRATION, wait_terminal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validators"))
from fake_hub_write import WritableFakeHub, WritableFakeHubServer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[WritableFakeHub]:
    (tmp_path / "hub").mkdir()
    with WritableFakeHubServer(tmp_path / "hub", FAKE_HF_TOKEN) as server:
        yield server


def _hub_env(hub: WritableFakeHub, tmp_path: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home")}


def test_job_pushes_with_card_and_links_the_commit(start_server, hub: WritableFakeHub, model_root: Path,
                                                   tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", roots=[model_root], env=_hub_env(hub, tmp_path))
    seen: list[str] = []
    with server.client as client:
        body = {"source": str(model_root / "gemma4"), "recipe": "nvfp4", "calibration": FAST_CALIBRATION,
                "push_to_hub": {"repo_id": "team/gemma4-tiny-NVFP4", "private": True}}
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        job = wait_terminal(client, created.json()["id"])
        assert job["status"] == "succeeded", job
        publish = job["publish"]
        commits = hub.commit_ids("team/gemma4-tiny-NVFP4")
        assert publish["commit"] == commits[0] and publish["created"] is True and len(commits) == 2
        assert publish["commit_url"].endswith(f"/team/gemma4-tiny-NVFP4/commit/{publish['commit']}")
        assert job["params"]["push_to_hub"]["repo_id"] == "team/gemma4-tiny-NVFP4"
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        uploads = [e for e in events if e["data"].get("repo_id") == "team/gemma4-tiny-NVFP4"]
        assert uploads and uploads[-1]["data"]["commit"] == publish["commit"], events
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert report["publish"] == publish
        page = client.get(f"/v1/jobs/{job['id']}/report", headers={"Accept": "text/html"}).text
        assert 'id="published"' in page and publish["commit_url"] in page
        seen += [json.dumps(job), json.dumps(events), json.dumps(report), page]
    remote = hub.root / "team" / "gemma4-tiny-NVFP4" / "main"
    output = Path(job["output_path"])
    for path in output.iterdir():
        if path.name != "README.md":
            assert (remote / path.name).read_bytes() == path.read_bytes(), path.name
    card = (remote / "README.md").read_text()
    assert "base_model" not in card, "a local source is no Hub model id"
    assert "team/gemma4-tiny-NVFP4" in hub.private
    server.stop()
    for text in (*seen, card, server.log_text()):
        assert FAKE_HF_TOKEN not in text


def test_rejected_token_fails_the_job_and_keeps_the_export(start_server, hub: WritableFakeHub, model_root: Path,
                                                          tmp_path: Path) -> None:
    bad = "hf_WRONGtokenFORthisHUB0123456789abcdef"
    server = start_server(tmp_path / "data", roots=[model_root], env={**_hub_env(hub, tmp_path), "HF_TOKEN": bad})
    with server.client as client:
        body = {"source": str(model_root / "gemma4"), "recipe": "nvfp4", "calibration": FAST_CALIBRATION,
                "push_to_hub": {"repo_id": "team/refused"}}
        job = wait_terminal(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "push_rejected", job
        assert "rejected the token (HTTP 401" in job["error"]["message"] and job["publish"] is None
        assert job["validation"]["ok"] is True, "the report of the validated export is attached"
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).text
    assert not (hub.root / "team" / "refused").exists()
    server.stop()
    for text in (json.dumps(job), events, server.log_text()):
        assert bad not in text and FAKE_HF_TOKEN not in text


def test_a_retried_job_does_not_commit_twice(hub: WritableFakeHub, model_root: Path, tmp_path: Path) -> None:
    """Two runs of one job (what recovery does after a crash): the second finds the job's commit."""
    results = []
    for attempt in (1, 2):
        job_dir = tmp_path / f"job-{attempt}"
        job_dir.mkdir()
        spec = {"job_id": "qjob_retried", "attempt": attempt, "source": str(model_root / "gemma4"), "recipe": "nvfp4",
                "dialect": "modelopt", "calibration": FAST_CALIBRATION, "output": str(tmp_path / f"out-{attempt}"),
                "job_dir": str(job_dir), "push_to_hub": {"repo_id": "team/retried", "private": False, "revision": None}}
        (job_dir / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, **_hub_env(hub, tmp_path), "HF_TOKEN": FAKE_HF_TOKEN}
        proc = subprocess.run([sys.executable, "-m", "quantgate.service.worker", str(job_dir / "spec.json")], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        results.append(next(line for line in lines if line["event"] == "result")["report"]["publish"])
        assert FAKE_HF_TOKEN not in proc.stdout + proc.stderr
    assert results[0]["created"] is True and results[1]["created"] is False
    assert results[0]["commit"] == results[1]["commit"] == hub.commit_ids("team/retried")[0]
    assert len(hub.commit_ids("team/retried")) == 2  # the repo's initial commit and the job's one
