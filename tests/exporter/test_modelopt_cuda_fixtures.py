"""Bit-identical to ModelOpt 0.47 as it runs on CUDA, on any device.

The fixtures under fixtures/modelopt_cuda were made by ModelOpt itself on an H200
(`benchmarks/modelopt_fixtures.py`): a one-layer Gemma4 MoE (q/k/v/o, dense gate/up/down, two fused
experts) quantized to NVFP4 and to FP8 and exported with `export_hf_checkpoint`. Our full export of
the same checkpoint, given ModelOpt's calibrated input amax, must equal it byte for byte: `weight`,
`weight_scale`, `weight_scale_2` and `input_scale` of every quantized module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics_helpers import CUDA, FIXTURES, bits
from safetensors.torch import load_file

from quantgate.exporter.numerics.fp8 import activation_scale, quantize_fp8
from quantgate.exporter.numerics.modes import MODELOPT_CPU, MODELOPT_CUDA, scalar_div, weight_over_scale
from quantgate.exporter.numerics.nvfp4 import nvfp4_global_scale, quantize_nvfp4
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize

FIXTURE = FIXTURES / "modelopt_cuda"
RECIPES = ("nvfp4", "fp8")
QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale")


def _modelopt(recipe: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / f"modelopt_{recipe}.safetensors")


def _export(recipe: str, device: str, out: Path) -> dict[str, torch.Tensor]:
    result = run_quantize(QuantizeRequest(source=str(FIXTURE / "source"), recipe=recipe, out=out, device=device,
                                          calib_stats=FIXTURE / f"modelopt_{recipe}_calibration.json"))
    assert result.ok and result.output is not None
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(result.output.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("recipe", RECIPES)
def test_export_is_bit_identical_to_modelopt_on_cuda(recipe: str, device: str, tmp_path: Path) -> None:
    expected = _modelopt(recipe)
    ours = _export(recipe, device, tmp_path / "out")
    quantized = {k.removesuffix(".weight_scale") for k in ours if k.endswith(".weight_scale")}
    ours_quant = {k: v for k, v in ours.items() if k.rsplit(".", 1)[0] in quantized}
    assert sorted(ours_quant) == sorted(expected)   # the same modules, the same tensors
    differing = [k for k in sorted(expected) if ours_quant[k].dtype != expected[k].dtype
                 or ours_quant[k].shape != expected[k].shape or not torch.equal(bits(ours_quant[k]), bits(expected[k]))]
    assert differing == []


def test_numerics_option_reproduces_modelopt_on_the_cpu(tmp_path: Path) -> None:
    """`quantgate quantize --numerics modelopt-cpu`: the same export with correctly rounded
    divisions; on this fixture exactly the planted global scales (and what they feed) move."""
    import subprocess
    import sys

    from numerics_helpers import REPO_ROOT

    stats = FIXTURE / "modelopt_nvfp4_calibration.json"
    out = tmp_path / "cpu"
    proc = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", str(FIXTURE / "source"), "--recipe",
                           "nvfp4", "--device", "cpu", "--calib-stats", str(stats), "--numerics", "modelopt-cpu",
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    ours, expected = load_file(out / "model.safetensors"), _modelopt("nvfp4")
    moved = {k.rsplit(".", 1)[0] for k in expected if not torch.equal(bits(ours[k]), bits(expected[k]))}
    source = load_file(FIXTURE / "source" / "model.safetensors")
    assert "model.layers.0.mlp.down_proj" in moved and "model.layers.0.self_attn.q_proj" in moved
    amax = source["model.layers.0.mlp.down_proj.weight"].abs().max().float()
    assert torch.equal(bits(ours["model.layers.0.mlp.down_proj.weight_scale_2"]),
                       bits(nvfp4_global_scale(amax, MODELOPT_CPU)))


def test_fixture_pins_the_cuda_global_scale() -> None:
    """The planted amaxes give a weight_scale_2 that ModelOpt-on-CPU bits would miss by one ulp."""
    expected = _modelopt("nvfp4")
    source = load_file(FIXTURE / "source" / "model.safetensors")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        w = source[f"{module}.weight"]
        if module.endswith("q_proj"):   # q/k/v share the global scale of the group's largest amax
            group = [source[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
            amax = torch.stack([g.abs().max().float() for g in group]).max()
        else:
            amax = w.abs().max().float()
        cuda, cpu = nvfp4_global_scale(amax, MODELOPT_CUDA), nvfp4_global_scale(amax, MODELOPT_CPU)
        assert torch.equal(bits(cuda), bits(expected[f"{module}.weight_scale_2"]))
        assert not torch.equal(bits(cpu), bits(cuda))
        if module.endswith("down_proj"):   # no group: the whole quantize call reproduces the export
            packed, block, _ = quantize_nvfp4(w)
            assert torch.equal(bits(packed), bits(expected[f"{module}.weight"]))
            assert torch.equal(bits(block), bits(expected[f"{module}.weight_scale"]))


def test_fixture_pins_the_cuda_fp8_scale_and_weight_division() -> None:
    """FP8 on CUDA: weight_scale = amax * fl32(1/448), one ulp off amax / 448 for the planted amax of
    down_proj; W / scale with the scale rounded to BF16 first, which moves 2.2% of gate_proj's e4m3
    codes (there both modes have the same scale, so only the division differs)."""
    expected = _modelopt("fp8")
    source = load_file(FIXTURE / "source" / "model.safetensors")
    for module in ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"):
        w = source[f"{module}.weight"]
        q_cuda, scale = quantize_fp8(w)
        q_cpu, scale_cpu = quantize_fp8(w, numerics=MODELOPT_CPU)
        assert torch.equal(bits(scale), bits(expected[f"{module}.weight_scale"]))
        assert torch.equal(bits(q_cuda), bits(expected[f"{module}.weight"]))
        if module.endswith("down_proj"):
            assert not torch.equal(bits(scale_cpu), bits(scale))
        else:
            assert torch.equal(bits(scale_cpu), bits(scale))
            assert int((bits(q_cpu) != bits(q_cuda)).sum()) == 729


def test_issue_example_global_scale() -> None:
    """Expert 10 of layer 0 in the issue: gate/up amax 0.10888671875; ModelOpt on CUDA wrote
    0x1.53cf3ep-15, a correctly rounded division gives 0x1.53cf3cp-15."""
    amax = torch.tensor(0.10888671875)
    assert float(nvfp4_global_scale(amax)).hex() == "0x1.53cf3e0000000p-15"
    assert float(nvfp4_global_scale(amax, MODELOPT_CPU)).hex() == "0x1.53cf3c0000000p-15"


def test_scalar_division_emulates_cuda_reciprocal_multiply() -> None:
    """`x * fl32(1/d)` on every BF16 value in [2^-8, 2^4): about a fifth of the NVFP4 global
    scales differ from the correctly rounded quotient, each by one ulp; no mode depends on the device."""
    codes = torch.arange(0x3B80, 0x4180, dtype=torch.int16)          # BF16 bit patterns, [2^-8, 2^4)
    x = codes.view(torch.bfloat16).float()
    cuda, cpu = scalar_div(x, 2688.0, MODELOPT_CUDA), scalar_div(x, 2688.0, MODELOPT_CPU)
    assert torch.equal(cpu, x / 2688.0)
    ulps = (cuda.view(torch.int32) - cpu.view(torch.int32)).abs()
    assert int(ulps.max()) == 1 and 0.1 < float((ulps == 1).float().mean()) < 0.4
    assert torch.equal(activation_scale(x, "NVFP4"), cuda) and torch.equal(activation_scale(x, "FP8", MODELOPT_CPU),
                                                                          x / 448.0)


def test_weight_over_scale_rounds_the_scale_to_the_weight_dtype_on_cuda() -> None:
    w = torch.tensor([[1.0, -3.0, 100.0]], dtype=torch.bfloat16)
    scale = torch.tensor(1.0 / 3.0)                        # not a BF16 value
    rounded = scale.to(torch.bfloat16).float()
    assert torch.equal(weight_over_scale(w, scale), (w.float() / rounded).to(torch.bfloat16))
    assert torch.equal(weight_over_scale(w, scale, MODELOPT_CPU), (w.float() / scale).to(torch.bfloat16))
    w32 = w.float()
    assert torch.equal(weight_over_scale(w32, scale), w32 / scale)   # fp32 weights: no rounding either way


def test_reused_stats_report_no_calibration_times(tmp_path: Path) -> None:
    """`--calib-stats` skips calibration, so the load/forward seconds recorded in the file (by the job
    that calibrated) must not appear as this job's stage times; the other stages are timed."""
    stats = json.loads((FIXTURE / "modelopt_nvfp4_calibration.json").read_text())
    stats["metadata"].update(load_seconds=12.5, seconds=1.7)   # what a calibrating job records
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(stats))
    result = run_quantize(QuantizeRequest(source=str(FIXTURE / "source"), recipe="nvfp4", out=tmp_path / "out",
                                          device="cpu", calib_stats=path))
    assert result.ok
    assert "load_seconds" not in result.timings and "forward_seconds" not in result.timings
    assert {"plan", "calibrate", "weights", "validate", "finalize", "total"} <= set(result.timings)
