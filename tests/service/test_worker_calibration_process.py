"""The service's worker (a fresh process per job) starts the job's calibration process first thing,
as the CLI does: its events reach the protocol stream, the job validates, and a bad setting of
`QUANTGATE_CALIBRATION_PROCESS` is the job's `bad_input`, not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quantgate.exporter.calibration.process import PROCESS_ENV
from quantgate.exporter.overlap import OVERLAP_ENV
from quantgate.service.worker import EXIT_BAD_INPUT, EXIT_OK


def _worker(spec: dict, tmp_path: Path, **env: str) -> tuple[int, list[dict]]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "quantgate.service.worker", str(path)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300, check=False)
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def _spec(source: Path, tmp_path: Path) -> dict:
    (tmp_path / "outputs").mkdir(exist_ok=True)
    return {"source": str(source), "recipe": "nvfp4", "output": str(tmp_path / "outputs" / "job-1"),
            "job_dir": str(tmp_path), "calibration": {"samples": 4, "seq_len": 16, "batch_size": 2}}


def test_a_worker_job_calibrates_in_its_own_process(tiny_model, tmp_path: Path) -> None:
    code, events = _worker(_spec(tiny_model("qwen3_moe"), tmp_path), tmp_path,
                           **{PROCESS_ENV: "1", OVERLAP_ENV: "1", "CUDA_VISIBLE_DEVICES": ""})
    assert code == EXIT_OK, events[-1]
    pids = [e["data"]["pid"] for e in events if e.get("stage") == "calibrate" and "pid" in e.get("data", {})]
    assert len(pids) == 1 and pids[0] > 0
    forward = [e for e in events if e.get("stage") == "calibrate" and "forward_seconds" in e.get("data", {})]
    assert forward, "the calibration process's own events are relayed"
    result = events[-1]
    assert result["event"] == "result" and result["ok"] and (Path(result["output"]) / "calibration.json").exists()


def test_a_bad_setting_is_the_jobs_bad_input(tiny_model, tmp_path: Path) -> None:
    code, events = _worker(_spec(tiny_model("qwen3_moe"), tmp_path), tmp_path, **{PROCESS_ENV: "sometimes"})
    assert code == EXIT_BAD_INPUT
    assert events[-1]["event"] == "error" and events[-1]["code"] == "bad_input"
    assert PROCESS_ENV in events[-1]["message"]
