"""compressed-tensors exports that keep the routed experts BF16 pass our own validator (issue 11 §4).

Before the fix, `ignore` listed the BF16 experts only under their Hugging Face names; vLLM checks a
MoE layer through `<engine moe prefix>.0.gate_proj` and does not apply Gemma4's `experts ->
moe.experts` rename to `ignore`, so QG205 failed the export. Every architecture of the tiny-model
table, the three ways a user keeps experts BF16:

* `w4a16` where the experts' in_features are not a multiple of the group (128): moe_intermediate 64;
  the issue's own demo Gemma4 (default sizes) too;
* `nvfp4 --dialect compressed-tensors --exclude '*experts*'`;
* `w8a8_int8 --exclude '*experts*'`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.source import open_source
from quantgate.exporter.testkit.tiny_models import TINY_ARCHS
from quantgate.validators.engines import ENGINE_SEMANTICS
from quantgate.validators.layout import Kind

CALIB = {"calib_samples": 2, "calib_seq_len": 16, "calib_batch_size": 2}
#: Attention and dense MLPs in multiples of 128 (W4A16 applies), experts' down_proj in_features 64.
W4A16_SIZES = {"hidden": 128, "head_dim": 32, "moe_intermediate": 64}
CASES = {
    "w4a16-group": ("w4a16", (), W4A16_SIZES),
    "nvfp4-exclude": ("nvfp4", ("*experts*",), {}),
    "w8a8-exclude": ("w8a8_int8", ("*experts*",), {}),
}


def _export(tiny_model, tmp_path: Path, arch: str, recipe: str, exclude, sizes) -> tuple[object, Path]:
    source = tiny_model(arch, **sizes)
    result = run_quantize(QuantizeRequest(source=str(source), recipe=recipe, out=tmp_path / "q", device="cpu",
                                          dialect="compressed-tensors", exclude=tuple(exclude), **CALIB))
    return result, source


def _check(result, arch: str) -> None:
    codes = [f.code for f in result.report.findings if f.severity.value == "error"]
    assert result.ok and "QG205" not in codes, codes
    out = result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    layout = open_source(str(out)).layout
    experts = [m for m in layout.modules.values() if m.kind is Kind.EXPERT]
    if not experts:
        return
    assert all("weight" in m.tensors or m.fused is not None for m in experts)
    quantized = [m.name for m in experts if "weight_packed" in m.tensors or "weight_scale" in m.tensors]
    assert quantized == [], "experts stay BF16"
    groups = sorted({m.moe_group for m in experts if m.moe_group})
    for sem in ENGINE_SEMANTICS.values():
        for group in groups:
            probe = sem.engine_name(f"{group}.0.gate_proj", layout.architecture)
            assert probe in qc["ignore"], (sem.name, probe)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bf16_experts_are_ignored_in_the_engine_name_space(tiny_model, tmp_path: Path, arch: str,
                                                           case: str) -> None:
    recipe, exclude, sizes = CASES[case]
    result, _ = _export(tiny_model, tmp_path, arch, recipe, exclude, sizes)
    _check(result, arch)


def test_the_demo_gemma4_w4a16_validates(tiny_model, tmp_path: Path) -> None:
    """The issue's reproduction: default tiny Gemma4 (in_features 64 everywhere but the dense down_proj)."""
    result, _ = _export(tiny_model, tmp_path, "gemma4", "w4a16", (), {})
    _check(result, "gemma4")
    ignore = json.loads((result.output / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.moe.experts.0.gate_proj" in ignore        # what vLLM consults
    assert "model.layers.0.experts.0.gate_proj" in ignore            # the Hugging Face name, kept
