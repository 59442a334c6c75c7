"""The GPU's first use made on a side thread while a CUDA job imports and plans
(exporter.device_warmup): started only for a job that runs on CUDA, never failing one, waited for
by the weight pass, and its timings in the job's."""

from __future__ import annotations

import os
import time

import pytest
import torch

from quantgate.exporter import device_warmup
from quantgate.exporter.calibration import process

DEVICE = os.environ.get("QUANTGATE_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(device_warmup, "_current", None)
    monkeypatch.delenv(device_warmup.WARMUP_ENV, raising=False)


@pytest.mark.parametrize(("device", "visible", "setting", "starts"), [
    ("cpu", True, None, False),
    ("auto", False, None, False),       # no driver, or CUDA_VISIBLE_DEVICES hides every GPU
    ("auto", True, "0", False),
    ("cuda", True, "0", False),
    ("auto", True, None, True),
    ("cuda", False, None, True),        # asked for: the job itself says when there is no GPU
    ("cuda", True, "1", True),
])
def test_started_for_a_job_on_cuda_only(monkeypatch, device: str, visible: bool, setting: str | None,
                                        starts: bool) -> None:
    monkeypatch.setattr(process, "gpu_visible", lambda: visible)
    ran: list[str] = []
    monkeypatch.setattr(device_warmup.Warmup, "_run", lambda self: ran.append(self.device))
    if setting is not None:
        monkeypatch.setenv(device_warmup.WARMUP_ENV, setting)
    warmup = device_warmup.start(device)
    assert (warmup is not None) == starts
    timings = device_warmup.wait()
    assert ran == ([device] if starts else [])
    assert set(timings) == ({"device_warmup", "device_warmup_wait"} if starts else set())
    assert device_warmup.start(device) is warmup   # once per process


def _fake_device(monkeypatch) -> list[str]:
    """The warm-up's steps without a GPU: returns the steps as they run."""
    steps: list[str] = []
    monkeypatch.setattr(device_warmup, "_retain_primary_context", lambda: steps.append("context"))
    monkeypatch.setattr(device_warmup, "_prepare", lambda device: steps.append("prepare") or "stream")
    monkeypatch.setattr(device_warmup, "_run_kernels", lambda stream: steps.append("kernels"))
    return steps


def test_kernels_run_only_once_the_job_has_imported_the_numerics(monkeypatch) -> None:
    """quantgate's numerics are used on the warm-up thread only once the job's thread has imported
    them: two threads importing them at once can deadlock on their module locks."""
    steps = _fake_device(monkeypatch)
    warmup = device_warmup.start("cuda")
    time.sleep(0.2)
    assert steps == ["context", "prepare"]
    device_warmup.start_kernels()
    timings = device_warmup.wait()
    assert steps == ["context", "prepare", "kernels"] and warmup.error is None
    assert timings["device_warmup"] >= 0.2


def test_the_weight_pass_waiting_lets_the_kernels_run(monkeypatch) -> None:
    steps = _fake_device(monkeypatch)
    device_warmup.start("cuda")
    device_warmup.wait()
    assert steps == ["context", "prepare", "kernels"]


def test_finish_skips_what_a_job_that_ended_early_never_needed(monkeypatch) -> None:
    steps = _fake_device(monkeypatch)
    warmup = device_warmup.start("cuda")
    device_warmup.finish()
    assert steps == ["context", "prepare"] and not warmup._thread.is_alive()
    device_warmup.finish()   # twice, or with none started: nothing to do


def test_a_failing_warmup_only_logs(monkeypatch) -> None:
    def broken(stream) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    _fake_device(monkeypatch)
    monkeypatch.setattr(device_warmup, "_run_kernels", broken)
    warmup = device_warmup.start("cuda")
    timings = device_warmup.wait()
    assert warmup.error is not None and "no CUDA-capable device" in warmup.error
    assert timings["device_warmup"] >= 0 and timings["device_warmup_wait"] >= 0


def test_a_setting_typo_is_a_usage_error(monkeypatch) -> None:
    from quantgate.exporter.switches import SettingError

    monkeypatch.setenv(device_warmup.WARMUP_ENV, "warm")
    with pytest.raises(SettingError, match=device_warmup.WARMUP_ENV):
        device_warmup.start("cuda")


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs QUANTGATE_TEST_DEVICE=cuda and a GPU")
def test_the_warmup_runs_the_batched_quantizer_on_the_gpu() -> None:
    warmup = device_warmup.start("cuda")
    device_warmup.start_kernels()
    timings = device_warmup.wait()
    assert warmup is not None and warmup.error is None, warmup.error
    assert timings["device_warmup"] > 0
