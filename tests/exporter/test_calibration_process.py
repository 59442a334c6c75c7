"""Calibration in its own process (exporter.calibration.process), started before the job imports torch.

Real processes: the export through a calibration process is byte-identical to the one-process job;
its progress is relayed in stage order; a domain error in the process is raised in the job as the same
class and message; a killed process, a failed weight pass and a job that goes away all end it and
leave no temporary directory; the CLI starts it where the table says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantgate.exporter.calibration import process as calibration_process
from quantgate.exporter.calibration.process import PROCESS_ENV, CalibrationProcess, wanted
from quantgate.exporter.calibration.stats import CalibrationError
from quantgate.exporter.overlap import OVERLAP_ENV
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.validators.errors import UsageError

CALIB = {"calib_samples": 4, "calib_seq_len": 16, "calib_batch_size": 2}
#: `QUANTGATE_TEST_DEVICE=cuda` runs the jobs on a GPU (where the CLI starts the process by default).
DEVICE = os.environ.get("QUANTGATE_TEST_DEVICE", "cpu")


def _request(source: Path, out: Path, **fields) -> QuantizeRequest:
    return QuantizeRequest(source=str(source), recipe="nvfp4", out=out, device=DEVICE, **{**CALIB, **fields})


def _fields(req: QuantizeRequest) -> dict:
    return {key: getattr(req, key) for key in calibration_process.REQUEST_FIELDS}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def _leftovers(tmp_path: Path, name: str) -> list[Path]:
    return [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp-")]


@pytest.mark.parametrize("arch", ["gemma4", "qwen3_moe"])
def test_export_through_the_calibration_process_is_byte_identical(tiny_model, tmp_path: Path, monkeypatch,
                                                                   arch: str) -> None:
    source = tiny_model(arch)
    monkeypatch.setenv(OVERLAP_ENV, "0")
    serial = run_quantize(_request(source, tmp_path / "serial"))
    monkeypatch.setenv(OVERLAP_ENV, "1")
    req = _request(source, tmp_path / "process")
    process = CalibrationProcess.start(_fields(req))
    events: list = []
    try:
        result = run_quantize(req, events.append, calibration=process)
    finally:
        process.close()
    assert serial.ok and result.ok
    assert _files(serial.output) == _files(result.output)
    first, second = (json.loads((r.output / "calibration.json").read_text()) for r in (serial, result))
    assert first["amax"] == second["amax"]
    assert list(dict.fromkeys(e.stage for e in events)) == ["plan", "calibrate", "quantize", "write", "validate",
                                                            "finalize"]
    relayed = [e for e in events if e.stage == "calibrate"]
    assert relayed[0].data["pid"] == process.proc.pid and relayed[-1].data["forward_seconds"] >= 0   # its own last
    assert result.timings["calibration_process_seconds"] >= result.timings["calibrate"] > 0
    assert process.proc.poll() == 0 and not process.workdir.exists()


def test_a_domain_error_in_the_process_is_raised_as_itself(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from quantgate.exporter.calibration.data import CalibrationDataError

    monkeypatch.setenv(OVERLAP_ENV, "1")
    req = _request(tiny_model("qwen3_moe"), tmp_path / "out", calib_data=str(tmp_path / "missing.jsonl"))
    process = CalibrationProcess.start(_fields(req))
    try:
        with pytest.raises(CalibrationDataError) as raised:
            run_quantize(req, calibration=process)
    finally:
        process.close()
    assert "missing.jsonl" in str(raised.value)
    assert not _leftovers(tmp_path, "out") and not (tmp_path / "out").exists()


def test_a_killed_process_is_a_clear_error_and_leaves_nothing(tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(OVERLAP_ENV, "1")
    req = _request(tiny_model("qwen3_moe"), tmp_path / "out")
    process = CalibrationProcess.start(_fields(req))
    os.kill(process.proc.pid, signal.SIGKILL)   # what the kernel's OOM killer does
    try:
        with pytest.raises(CalibrationError, match="killed by SIGKILL: out of memory"):
            run_quantize(req, calibration=process)
    finally:
        process.close()
    assert not _leftovers(tmp_path, "out")


def test_a_failed_weight_pass_ends_the_calibration_process(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from quantgate.exporter import pipeline

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv(OVERLAP_ENV, "1")
    monkeypatch.setattr(pipeline, "write_export", broken)
    req = _request(tiny_model("qwen3_moe"), tmp_path / "out")
    process = CalibrationProcess.start(_fields(req))
    try:
        with pytest.raises(OSError, match="No space left"):
            run_quantize(req, calibration=process)
        assert process.proc.poll() is not None      # ended before the job's error surfaced
    finally:
        process.close()
    assert not _leftovers(tmp_path, "out")


def test_the_process_exits_when_the_job_goes(tiny_model, tmp_path: Path) -> None:
    process = CalibrationProcess.start(_fields(_request(tiny_model("qwen3_moe"), tmp_path / "out")))
    process.proc.stdin.close()                      # the job's end of the pipe: as when its process dies
    try:
        assert process.proc.wait(timeout=60) == 3
    finally:
        process.close()


def test_a_job_that_does_not_calibrate_beside_the_pass_ends_the_process(tiny_model, tmp_path: Path,
                                                                         monkeypatch) -> None:
    monkeypatch.setenv(OVERLAP_ENV, "0")             # serial: this process calibrates itself
    req = _request(tiny_model("qwen3_moe"), tmp_path / "out")
    process = CalibrationProcess.start(_fields(req))
    try:
        result = run_quantize(req, calibration=process)
        assert result.ok and process.proc.poll() is not None and "calibration_process_seconds" not in result.timings
    finally:
        process.close()


@pytest.mark.parametrize(("env", "fields", "expected"), [
    ("", {"device": "cuda"}, True),
    ("", {"device": "cpu"}, False),
    ("1", {"device": "cpu"}, True),
    ("0", {"device": "cuda"}, False),
    ("", {"device": "cuda", "calib_stats": "stats.json"}, False),   # nothing to calibrate
    ("", {"device": "cuda", "recipe": "w4a16"}, False),             # weight-only: no activation statistics
    ("", {"device": "cuda", "recipe": "auto"}, False),              # scores and calibrates with one model
    ("1", {"device": "cpu", "recipe": "no-such-recipe"}, False),    # the job itself reports the recipe
])
def test_when_the_cli_starts_a_calibration_process(monkeypatch, env: str, fields: dict, expected: bool) -> None:
    monkeypatch.setenv(PROCESS_ENV, env)
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    assert wanted({"recipe": "nvfp4", **fields}) is expected


@pytest.mark.parametrize(("visible", "driver", "expected"), [(None, True, True), ("0", True, True), ("", True, False),
                                                            ("-1", True, False), (None, False, False)])
def test_device_auto_starts_one_where_a_gpu_is_visible(tmp_path: Path, monkeypatch, visible, driver: bool,
                                                       expected: bool) -> None:
    """`--device auto` (the service's jobs): a loaded driver and a CUDA_VISIBLE_DEVICES that hides
    nothing (the service's CPU slots set it empty), judged without importing torch."""
    control = tmp_path / "nvidiactl"
    if driver:
        control.touch()
    monkeypatch.setattr(calibration_process, "NVIDIA_CONTROL", control)
    monkeypatch.delenv(PROCESS_ENV, raising=False)
    monkeypatch.delenv(OVERLAP_ENV, raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert wanted({"recipe": "nvfp4", "device": "auto"}) is expected


def test_no_process_when_the_overlap_is_off_and_a_typo_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(OVERLAP_ENV, "0")
    assert wanted({"recipe": "nvfp4", "device": "cuda"}) is False
    monkeypatch.setenv(PROCESS_ENV, "sometimes")
    with pytest.raises(UsageError, match="expected auto, 1 or 0"):
        wanted({"recipe": "nvfp4", "device": "cuda"})


def test_cli_job_with_a_calibration_process(tiny_model, tmp_path: Path) -> None:
    """`quantgate quantize` starts the process first thing; its events and timings reach the JSON lines."""
    out = tmp_path / "out"
    env = {**os.environ, PROCESS_ENV: "1", OVERLAP_ENV: "1"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", str(tiny_model("gemma4")),
                           "--recipe", "nvfp4", "--device", DEVICE, "--calib-samples", "4", "--calib-seq-len", "16",
                           "--out", str(out), "--progress", "json"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    pid = next(e["data"]["pid"] for e in lines if e.get("stage") == "calibrate" and "pid" in e.get("data", {}))
    result = lines[-1]
    assert result["event"] == "result" and result["ok"]
    assert 0 < result["timings"]["calibration_process_seconds"] < time.perf_counter() - t
    assert (out / "calibration.json").exists() and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
