"""Calibration and the weight pass run at once (exporter.overlap, exporter.deferred_scales).

The same job with and without the overlap writes byte-identical files, for every dialect and
activation-scaled scheme, on per-expert, fused 3-D and transposed 3-D ("BMM") experts; a failure on
either side stops the other and leaves no temporary directory; a writer whose input-scale
arithmetic drifts from the deferred formulas fails loudly instead of writing stale bits.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantgate.exporter import deferred_scales
from quantgate.exporter.calibration.stats import ActivationStats
from quantgate.exporter.calibration import model as calib_model
from quantgate.exporter.deferred_scales import PLACEHOLDER_AMAX, DeferredInputScaleError
from quantgate.exporter.overlap import OVERLAP_ENV, overlap_enabled, run_concurrently
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.weight_pass import PROGRESS_STEP
from quantgate.exporter.writers.shard_plan import OutTensor, Shard, Unit
from quantgate.exporter.writers.sharding import ShardWriter, patch_tensors

#: `QUANTGATE_TEST_DEVICE=cuda` runs the byte-identity cases on a GPU (where the overlap is the default).
DEVICE = os.environ.get("QUANTGATE_TEST_DEVICE", "cpu")
CALIB = {"calib_samples": 4, "calib_seq_len": 16, "calib_batch_size": 2}
#: (arch, recipe, dialect): per-expert (mixtral), fused 3-D (gemma4, qwen3_moe), BMM (gpt_oss).
CASES = [
    ("gemma4", "nvfp4", "modelopt"),
    ("qwen3_moe", "fp8", "modelopt"),
    ("mixtral", "nvfp4", "modelopt"),
    ("gpt_oss", "nvfp4", "modelopt"),
    ("gpt_oss", "fp8", "modelopt"),
    ("qwen3_moe", "nvfp4", "compressed-tensors"),
    ("gemma4", "fp8", "compressed-tensors"),
]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def _run(monkeypatch, source: Path, out: Path, recipe: str, dialect: str, overlap: str, events=None):
    monkeypatch.setenv(OVERLAP_ENV, overlap)
    req = QuantizeRequest(source=str(source), recipe=recipe, dialect=dialect, out=out, device=DEVICE, **CALIB)
    return run_quantize(req, events.append if events is not None else None)


@pytest.mark.parametrize(("arch", "recipe", "dialect"), CASES)
def test_overlapped_export_is_byte_identical(tiny_model, tmp_path: Path, monkeypatch, arch, recipe, dialect) -> None:
    source = tiny_model(arch)
    serial = _run(monkeypatch, source, tmp_path / "serial", recipe, dialect, "0")
    events: list = []
    both = _run(monkeypatch, source, tmp_path / "both", recipe, dialect, "1", events)
    assert serial.ok and both.ok
    assert "overlap_seconds" not in serial.timings
    assert {"overlap_seconds", "input_scales_patch", "calibrate", "weights"} <= set(both.timings)
    first, second = _files(serial.output), _files(both.output)
    assert first and first == second            # every shard, header and byte
    stats = [ActivationStats.load(r.output / "calibration.json") for r in (serial, both)]
    assert stats[0].amax == stats[1].amax
    # the stages still first appear in their documented order, and the pass reports ~1 % steps
    assert list(dict.fromkeys(e.stage for e in events)) == ["plan", "calibrate", "quantize", "write", "validate",
                                                            "finalize"]
    quantize = [e.fraction for e in events if e.stage == "quantize"]
    assert quantize[-1] == 1.0 and len(quantize) <= 1 / PROGRESS_STEP + 1
    patched = [e for e in events if e.stage == "write" and "patched" in e.data]
    scales = [k for f in first for k in load_file(str(serial.output / f)) if "input" in k and "scale" in k]
    assert len(patched) == 1 and patched[0].data["patched"] == len(scales) > 0
    # the placeholder never survives: no input scale of the export is the placeholder's
    tensors = {k: v for f in second for k, v in load_file(str(both.output / f)).items() if k in scales}
    placeholder = {k for k, v in tensors.items() if v.float().reshape(-1)[0].item() in _placeholder_values()}
    assert not placeholder


def _placeholder_values() -> set[float]:
    from quantgate.exporter.numerics.fp8 import activation_scale

    a = torch.tensor(PLACEHOLDER_AMAX)
    return {activation_scale(a, s).item() for s in ("NVFP4", "FP8")} | {1 / activation_scale(a, "NVFP4").item()}


def test_calibration_failure_stops_the_weight_pass_and_cleans_up(tiny_model, tmp_path: Path, monkeypatch) -> None:
    source = tiny_model("qwen3_moe")
    started = threading.Event()

    def failing_load(*args, **kwargs):
        started.wait(10)                       # the weight pass is under way
        raise RuntimeError("load failed on purpose")

    monkeypatch.setattr(calib_model, "load_calibration_model", failing_load)
    quantize_events: list = []

    def events(event) -> None:
        if event.stage == "quantize":
            quantize_events.append(event)
            started.set()
            time.sleep(0.05)                   # slow enough that the pass cannot finish first

    monkeypatch.setenv(OVERLAP_ENV, "1")
    out = tmp_path / "out"
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=out, device="cpu", **CALIB)
    with pytest.raises(RuntimeError, match="load failed on purpose"):
        run_quantize(req, events)
    assert quantize_events and quantize_events[-1].fraction < 1.0       # stopped part way
    assert not any(tmp_path.iterdir()), "temporary directory left behind"
    assert not [t for t in threading.enumerate() if t.name == "quantgate-calibrate"]


def test_weight_pass_failure_stops_calibration_and_cleans_up(tiny_model, tmp_path: Path, monkeypatch) -> None:
    source = tiny_model("qwen3_moe")
    calibrate_events: list = []

    def hook(nbytes: int) -> None:
        raise OSError("disk full on purpose")

    def events(event) -> None:
        if event.stage == "calibrate":
            calibrate_events.append(event)

    real_load = calib_model.load_calibration_model

    def slow_load(*args, **kwargs):
        time.sleep(0.5)                        # the weight pass fails while the model loads
        return real_load(*args, **kwargs)

    monkeypatch.setattr(calib_model, "load_calibration_model", slow_load)
    monkeypatch.setenv(OVERLAP_ENV, "1")
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=tmp_path / "out", device="cpu", **CALIB)
    with pytest.raises(OSError, match="disk full on purpose"):
        run_quantize(req, events, _writer_hook=hook)
    assert not any(e.fraction == 1.0 for e in calibrate_events), "calibration ran to its end"
    assert not any(tmp_path.iterdir())
    assert not [t for t in threading.enumerate() if t.name == "quantgate-calibrate"]


def test_a_writer_drifting_from_the_deferred_formula_fails_loudly(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """A writer whose stored input scale is not the registry's `stored_input_scale` (here: the ModelOpt
    writer's, doubled) fails the job: the deferred patch would otherwise overwrite it with other bits."""
    from quantgate.exporter.writers import modelopt, modelopt_batched

    real_members, real_scales = modelopt.quantize_members, modelopt_batched.stored_input_scales

    def drifted_members(*args, **kwargs):
        out = real_members(*args, **kwargs)
        return {k: v * 2 if k.endswith(".input_scale") else v for k, v in out.items()}

    def drifted_scales(*args, **kwargs):
        suffix, t = real_scales(*args, **kwargs)
        return suffix, t * 2

    monkeypatch.setattr(modelopt, "quantize_members", drifted_members)
    monkeypatch.setattr(modelopt_batched, "stored_input_scales", drifted_scales)   # the CUDA weight pass
    with pytest.raises(DeferredInputScaleError, match="input_scale is not what the deferred"):
        _run(monkeypatch, tiny_model("mixtral"), tmp_path / "out", "nvfp4", "modelopt", "1")
    assert not any(tmp_path.iterdir())


def test_an_input_scale_the_formulas_do_not_write_fails_loudly(tiny_model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(deferred_scales, "input_scale_tensors", lambda unit, amax, numerics, source: {})
    with pytest.raises(DeferredInputScaleError, match="does not write"):
        _run(monkeypatch, tiny_model("mixtral"), tmp_path / "out", "nvfp4", "modelopt", "1")


def test_patch_tensors_writes_at_the_planned_offsets(tmp_path: Path) -> None:
    a = OutTensor("a.weight", "BF16", (4, 8))
    s = OutTensor("a.input_scale", "F32", ())
    shard = Shard("model.safetensors", [Unit((a, s), job=None)])
    weight = torch.randn(4, 8).to(torch.bfloat16)
    writer = ShardWriter(tmp_path)
    writer.write(shard, lambda unit: {"a.weight": weight, "a.input_scale": torch.tensor(0.0)})
    writer.close()
    patch_tensors(tmp_path, [shard], {"a.input_scale": torch.tensor(0.125).numpy().tobytes()})
    back = load_file(str(tmp_path / "model.safetensors"))
    assert back["a.input_scale"].item() == 0.125 and torch.equal(back["a.weight"], weight)
    with pytest.raises(RuntimeError, match="planned 4"):
        patch_tensors(tmp_path, [shard], {"a.input_scale": b"\0" * 8})
    with pytest.raises(RuntimeError, match="not in the shard plan"):
        patch_tensors(tmp_path, [shard], {"b.input_scale": b"\0" * 4})


@pytest.mark.parametrize(("env", "device", "dialect", "expected"), [
    ("", "cuda", "modelopt", True), ("auto", "cpu", "modelopt", False), ("1", "cpu", "compressed-tensors", True),
    ("0", "cuda", "modelopt", False), ("1", "cpu", "no-such-dialect", False),
])
def test_overlap_enabled_table(monkeypatch, env, device, dialect, expected) -> None:
    monkeypatch.setenv(OVERLAP_ENV, env)
    assert overlap_enabled(torch.device(device), dialect) is expected


def test_overlap_env_typo_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(OVERLAP_ENV, "maybe")
    with pytest.raises(ValueError, match="expected auto, 1 or 0"):
        overlap_enabled(torch.device("cpu"), "modelopt")


def test_run_concurrently_reports_how_long_both_ran() -> None:
    def calibrate(progress):
        time.sleep(0.3)
        return "stats"

    def weight_pass(progress, check):
        time.sleep(0.2)
        check()
        return "written"

    stats, written, together = run_concurrently(calibrate, weight_pass, None)
    assert (stats, written) == ("stats", "written")
    assert 0.15 < together["overlap_seconds"] < 0.3 and together["calibrate_wait_seconds"] > 0.05


def test_progress_bar_shares_one_line_between_stages_that_report_at_once() -> None:
    import io

    from quantgate.exporter.progress import BarProgress, ProgressEvent

    stream = io.StringIO()
    bar = BarProgress(stream)
    for event in (ProgressEvent("plan", 1.0, "planned"), ProgressEvent("calibrate", 0.1, "loading"),
                  ProgressEvent("quantize", 0.5, "layer 0"), ProgressEvent("calibrate", 1.0, "calibrated"),
                  ProgressEvent("quantize", 1.0, "quantized")):
        bar(event)
    bar.close()
    lines = stream.getvalue().split("\n")
    # plan's line, then calibrate/quantize redrawn in place until calibrate finished, then quantize
    assert len(lines) == 4 and lines[-1] == ""
    assert "calibrated" in lines[1].rsplit("\r", 1)[-1] and "quantized" in lines[2]


def test_weight_pass_started_with_calibration_is_byte_identical(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """The default starts the weight pass after transformers' imports; `start` starts both at once."""
    from quantgate.exporter.overlap import DEFAULT_OVERLAP_START, OVERLAP_START_ENV

    assert DEFAULT_OVERLAP_START == "imports"
    source = tiny_model("qwen3_moe")
    serial = _run(monkeypatch, source, tmp_path / "serial", "nvfp4", "modelopt", "0")
    monkeypatch.setenv(OVERLAP_START_ENV, "start")
    early = _run(monkeypatch, source, tmp_path / "early", "nvfp4", "modelopt", "1")
    assert _files(serial.output) == _files(early.output)
    assert early.timings["transformers_import_seconds"] >= 0 and "overlap_seconds" in early.timings
    monkeypatch.setenv(OVERLAP_START_ENV, "later")
    with pytest.raises(ValueError, match="expected one of start, imports"):
        _run(monkeypatch, source, tmp_path / "typo", "nvfp4", "modelopt", "1")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".typo")]


def test_weight_pass_reports_progress_in_steps_not_per_unit(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from quantgate.exporter import weight_pass

    monkeypatch.setattr(weight_pass, "PROGRESS_STEP", 0.25)
    events: list = []
    result = _run(monkeypatch, tiny_model("mixtral"), tmp_path / "out", "nvfp4", "modelopt", "0", events)
    quantize = [e.fraction for e in events if e.stage == "quantize"]
    units = sum(1 for f in _files(result.output) for k in load_file(str(result.output / f)) if k.endswith(".weight"))
    assert units > 5 and 2 <= len(quantize) <= 5 and quantize[-1] == 1.0
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(quantize[:-1]))   # the last one may be closer


#: (arch, recipe, dialect, batched): the batched NVFP4 writer (its CPU form) and the per-unit writers.
WALKER_CASES = [("gemma4", "nvfp4", "modelopt", True), ("qwen3_moe", "fp8", "modelopt", False),
                ("gemma4", "fp8", "compressed-tensors", False)]


@pytest.mark.parametrize(("arch", "recipe", "dialect", "batched"), WALKER_CASES)
def test_units_written_by_the_walking_thread_are_byte_identical(tiny_model, tmp_path: Path, monkeypatch, arch,
                                                                 recipe, dialect, batched) -> None:
    """`QUANTGATE_WRITES=walker` (the plan's walker writes every unit) writes the same files, with and
    without the overlap (its deferred input scales are recorded from the walker's thread then)."""
    from quantgate.exporter.weight_pass import WRITES_ENV
    from quantgate.exporter.writers import modelopt_batched

    if batched:
        monkeypatch.setattr(modelopt_batched, "BATCH_DEVICES", frozenset({"cpu", "cuda"}))
    source = tiny_model(arch)
    monkeypatch.setenv(WRITES_ENV, "producers")
    producers = _run(monkeypatch, source, tmp_path / "producers", recipe, dialect, "0")
    monkeypatch.setenv(WRITES_ENV, "walker")
    walker = _run(monkeypatch, source, tmp_path / "walker", recipe, dialect, "0")
    both = _run(monkeypatch, source, tmp_path / "both", recipe, dialect, "1")
    assert producers.ok and walker.ok and both.ok
    assert _files(producers.output) == _files(walker.output) == _files(both.output)


@pytest.mark.parametrize(("env", "device", "expected"), [("", "cpu", "producers"), ("", "cuda", "walker"),
                                                         ("walker", "cpu", "walker"), (" Producers ", "cuda", "producers")])
def test_who_writes_the_units(monkeypatch, env, device, expected) -> None:
    from quantgate.exporter.weight_pass import WRITES_ENV, writes_on

    monkeypatch.setenv(WRITES_ENV, env)
    assert writes_on(torch.device(device)) == expected
    monkeypatch.setenv(WRITES_ENV, "consumer")
    with pytest.raises(ValueError, match="expected one of producers, walker"):
        writes_on(torch.device(device))
