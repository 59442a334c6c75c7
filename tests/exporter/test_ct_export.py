"""compressed-tensors exports of tiny Qwen3-MoE, Mixtral and Llama: clean validation, layout, and a
dequantize round trip within each scheme's error.

The error bounds are derived as in test_export_logits.py (no number hard-coded):
1. eps: the relative error quantize-dequantize gives a 1024x1024 N(0, 1) BF16 matrix with
   `quantgate.exporter.numerics` (W4A16 ~ 0.11, NVFP4 ~ 0.095, FP8 ~ 0.028, W8A8 ~ 0.005).
2. Weights: every quantized module's dequantized weight is within WEIGHT_MARGIN * eps of its source
   weight (the tiny models are normal-initialised, so their per-module error is the Gaussian one; a
   wrong scale, a packing-order bug or a swapped module is off by far more).
3. Logits: the dequantized model's relative logits error is at most MARGIN times the error of the
   same model with Gaussian noise of power eps^2 * mean(W^2) added to exactly the quantized weights.
"""

from __future__ import annotations

import pytest
import torch
from ct_helpers import ct_exported_fixture  # noqa: F401  (the session fixture `ct_exported`)
from logit_bounds import assert_logits_within_noise_bound

from quantgate.exporter.testkit.dequant_load import dequantize_module
from quantgate.exporter.recipes import get_recipe, make_plan
from quantgate.exporter.source import open_source
from quantgate.validators.schemes import COMPRESSED_TENSORS, scheme

ARCHS = ("qwen3_moe", "mixtral", "llama")
RECIPES = ("w4a16", "w8a8_int8", "nvfp4a16", "nvfp4", "fp8")
CASES = [(a, r) for a in ARCHS for r in RECIPES]
WEIGHT_MARGIN = 1.25


@pytest.fixture(scope="module")
def scheme_eps() -> dict[str, float]:
    """Relative quantize-dequantize error of each compressed-tensors scheme on Gaussian weights."""
    from quantgate.exporter.numerics import (
        dequantize_fp8,
        dequantize_nvfp4,
        dequantize_w4a16,
        dequantize_w8a8_int8,
        quantize_fp8,
        quantize_nvfp4,
        quantize_w4a16,
        quantize_w8a8_int8,
    )

    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = w.float()
    nvfp4 = dequantize_nvfp4(*quantize_nvfp4(w), dtype=torch.float32)
    deq = {"W4A16": dequantize_w4a16(*quantize_w4a16(w), dtype=torch.float32),
           "W8A8": dequantize_w8a8_int8(*quantize_w8a8_int8(w), dtype=torch.float32),
           "NVFP4": nvfp4, "NVFP4A16": nvfp4, "FP8": dequantize_fp8(*quantize_fp8(w), dtype=torch.float32)}
    return {name: float((d - ref).norm() / ref.norm()) for name, d in deq.items()}


def test_scheme_noise_levels(scheme_eps: dict[str, float]) -> None:
    """Sanity of step 1: int4 g128 ~ 19 dB, NVFP4 ~ 20 dB, FP8 ~ 31 dB, int8 per-channel ~ 46 dB."""
    assert 0.08 < scheme_eps["W4A16"] < 0.14
    assert 0.07 < scheme_eps["NVFP4"] < 0.12
    assert 0.015 < scheme_eps["FP8"] < 0.04
    assert 0.002 < scheme_eps["W8A8"] < 0.01


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_export_validates_clean(ct_exported, arch: str, recipe: str) -> None:
    """Every module the recipe covers is quantized, nothing else; no error or warning finding."""
    source_dir, result = ct_exported(arch, recipe)
    assert result.ok, [f.message for f in result.report.findings]
    assert not [f for f in result.report.findings if f.severity.value != "info"], result.report.findings
    assert result.report.dialect == COMPRESSED_TENSORS
    assert not (result.output / "hf_quant_config.json").exists()
    source = open_source(str(source_dir))
    plan = make_plan(source.layout, recipe, dialect=COMPRESSED_TENSORS)
    assert plan.quantized() and not plan.warnings        # the CT sizes let every decoder Linear quantize
    export = open_source(str(result.output))
    spec = scheme(COMPRESSED_TENSORS, get_recipe(recipe).scheme_name)
    for name in plan.quantized():
        module = export.layout.modules[name]
        assert set(module.tensors) == spec.required_suffixes, name
    assert (result.output / "calibration.json").exists() == spec.activation_scales


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_dequantized_weights_within_scheme_error(ct_exported, scheme_eps, arch: str, recipe: str) -> None:
    source_dir, result = ct_exported(arch, recipe)
    source, export = open_source(str(source_dir)), open_source(str(result.output))
    spec_name = get_recipe(recipe).scheme_name
    errors = {}
    for name in make_plan(source.layout, recipe, dialect=COMPRESSED_TENSORS).quantized():
        ref = source.module_weight(source.layout.modules[name]).float()
        deq = dequantize_module(export, export.layout.modules[name], torch.float32)
        errors[name] = float((deq - ref).norm() / ref.norm())
    worst = max(errors, key=errors.get)
    assert errors[worst] <= WEIGHT_MARGIN * scheme_eps[spec_name], (worst, errors[worst], scheme_eps[spec_name])
    assert min(errors.values()) >= scheme_eps[spec_name] / 4, errors    # the weights really were quantized


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_dequantized_logits_within_scheme_bound(ct_exported, scheme_eps, arch: str, recipe: str) -> None:
    source_dir, result = ct_exported(arch, recipe)
    source = open_source(str(source_dir))
    eps = scheme_eps[get_recipe(recipe).scheme_name]
    plan = make_plan(source.layout, recipe, dialect=COMPRESSED_TENSORS)
    noisy = {source.layout.modules[n].tensors["weight"].name: eps for n in plan.quantized()}
    assert_logits_within_noise_bound(source, source_dir, result.output, noisy)


@pytest.mark.parametrize("recipe", ["nvfp4a16", "nvfp4"])
def test_fused_groups_share_ct_global_scales(ct_exported, recipe: str) -> None:
    """q/k/v and each expert's gate/up carry one weight_global_scale, the reciprocal of ModelOpt's
    amax / 2688 (so large numbers), and every expert of a layer one input_global_scale per input."""
    _, result = ct_exported("qwen3_moe", recipe)
    export = open_source(str(result.output))
    modules = export.layout.modules
    by_group: dict[str, set[float]] = {}
    for module in modules.values():
        if "weight_global_scale" in module.tensors and module.fused_group:
            value = float(export.tensor(module.tensors["weight_global_scale"].name).item())
            assert value > 1.0, module.name          # 2688 / amax with amax < 2688
            by_group.setdefault(module.fused_group, set()).add(value)
    assert by_group and all(len(values) == 1 for values in by_group.values()), by_group
    if recipe == "nvfp4":
        gate_inputs = {float(export.tensor(m.tensors["input_global_scale"].name).item())
                       for m in modules.values() if m.moe_group and m.layer == 0 and m.role in ("gate", "up")}
        assert len(gate_inputs) == 1


def test_mixtral_experts_keep_their_source_names(ct_exported) -> None:
    """Per-expert sources keep their own names (w1/w2/w3), which vLLM, SGLang and transformers all map."""
    _, result = ct_exported("mixtral", "w4a16")
    names = set(open_source(str(result.output)).view.tensors)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight_packed" in names
    assert not any(".gate_proj." in n for n in names)
