"""The batched NVFP4 weight pass (GPU path) writes exactly the bytes of the per-group one.

`quantgate.exporter.writers.modelopt_batched` stacks many groups' weights and quantizes them together. It
is used on CUDA; here it runs on the CPU (the math is device agnostic) and every output tensor is
compared bit for bit with `modelopt.quantize_group`, then a whole export made with batching is
compared file by file with the default export.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantgate.exporter.calibration.stats import ActivationStats
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.recipes import make_plan
from quantgate.exporter.source import open_source
from quantgate.exporter.writers import modelopt, modelopt_batched
from quantgate.exporter.writers.modelopt_batched import batchable, plan_batches, quantize_batch
from quantgate.exporter.writers.shard_plan import OutTensor, Unit
from quantgate.exporter.writers.sharding import checked_bytes

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", ["gemma4", "qwen3_5_moe", "deepseek_v3", "llama"])
def test_batch_equals_per_group_bit_for_bit(exported, arch: str) -> None:
    source_dir, first = exported(arch, "nvfp4")
    source = open_source(str(source_dir))
    plan = make_plan(source.layout, "nvfp4")
    stats = ActivationStats.load((first.output or first.temp_output) / "calibration.json")
    scales = modelopt.InputScales(plan, source, stats)
    units = [u for u in modelopt.build_units(source, plan) if batchable(u)]
    assert units and any(len(u.job.modules) > 1 for u in units)   # fused groups share weight_scale_2
    batched = quantize_batch(units, source, scales, CPU)
    for unit, got in zip(units, batched):
        want = modelopt.quantize_group(unit.job, source, scales, CPU)
        assert got.keys() == want.keys() == {t.name for t in unit.tensors}
        planned = {t.name: t for t in unit.tensors}
        for name, tensor in want.items():   # the shard writer's own check: planned dtype and shape, then bytes
            assert bytes(checked_bytes(got[name], planned[name])) == bytes(checked_bytes(tensor, planned[name])), name


def test_nan_weight_is_a_clear_error(exported, tmp_path: Path) -> None:
    source_dir, first = exported("llama", "nvfp4")
    source = open_source(str(source_dir))
    plan = make_plan(source.layout, "nvfp4")
    scales = modelopt.InputScales(plan, source, ActivationStats.load(first.output / "calibration.json"))
    unit = next(u for u in modelopt.build_units(source, plan) if batchable(u))
    real = source.tensor

    def poisoned(name: str, **kw) -> torch.Tensor:
        t = real(name, **kw).clone()
        t.view(-1)[0] = float("nan")
        return t

    source.tensor = poisoned   # type: ignore[method-assign]
    with pytest.raises(Exception, match="NaN or Inf"):
        quantize_batch([unit], source, scales, CPU)


def test_batches_are_consecutive_and_bounded() -> None:
    def unit(name: str, quantized: bool) -> Unit:
        return Unit(tensors=(OutTensor(name, "U8", (10,)),), job=name if not quantized else None)

    units = [unit(f"t{i}", False) for i in range(5)]
    assert plan_batches(units, [10] * 5, max_bytes=25) == [[0], [1], [2], [3], [4]]   # none batchable


def test_batched_export_matches_default_export_file_for_file(exported, tmp_path: Path, monkeypatch) -> None:
    source_dir, first = exported("gemma4", "nvfp4")
    stats = first.output / "calibration.json"
    monkeypatch.setattr(modelopt_batched, "BATCH_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(modelopt_batched, "MAX_BATCH_OUTPUT_BYTES", 64_000)   # several batches
    req = QuantizeRequest(source=str(source_dir), recipe="nvfp4", out=tmp_path / "batched", device="cpu",
                          calib_stats=stats, shard_size=100_000)
    batched = run_quantize(req)
    assert batched.ok
    monkeypatch.setattr(modelopt_batched, "BATCH_DEVICES", frozenset())
    plain = run_quantize(QuantizeRequest(**{**req.__dict__, "out": tmp_path / "plain"}))
    files = sorted(p.name for p in plain.output.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in batched.output.glob("*.safetensors"))
    for name in files:
        assert (batched.output / name).read_bytes() == (plain.output / name).read_bytes(), name
