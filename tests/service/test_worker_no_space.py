"""A job whose output root has no room for its shards fails as `no_space` (the operator's to fix),
with the worker's message naming the space needed, and leaves nothing at the output path."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from quantgate.service.executors.outcome import interpret
from quantgate.service.worker import EXIT_INTERNAL, Channel, run_job


def test_a_job_without_room_for_its_shards_fails_as_no_space(tiny_model, tmp_path: Path, monkeypatch) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    out = tmp_path / "outputs" / "job-1"
    out.parent.mkdir()
    spec = {"source": str(tiny_model("qwen3_moe")), "recipe": "nvfp4", "output": str(out),
            "job_dir": str(tmp_path / "job"), "calibration": {"samples": 2, "seq_len": 8, "batch_size": 2}}
    stream = io.StringIO()
    code = run_job(spec, Channel(stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    errors = [e for e in events if e["event"] == "error"]
    assert code == EXIT_INTERNAL and len(errors) == 1
    assert errors[0]["code"] == "no_space"
    assert "4.1 kB free" in errors[0]["message"] and "elsewhere (--out" in errors[0]["message"]
    outcome = interpret(code, None, errors[0], [])
    assert outcome.status == "failed" and outcome.error_code == "no_space"
    assert not out.exists() and not list(out.parent.iterdir())
