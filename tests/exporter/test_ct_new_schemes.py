"""compressed-tensors MXFP4 (recipe `mxfp4`) and FP8_BLOCK (recipe `fp8_block --dialect compressed-tensors`),
both added through the scheme registry only.

The reference producer is llm-compressor 0.14 / compressed-tensors 0.20 (`benchmarks/ct_reference_fixtures.py`
ran it and committed its tensors and config dumps under fixtures/compressed_tensors/): an export of a
checkpoint holding the fixture weights must carry exactly its bytes and config group. Tiny Gemma4 and
Qwen3-MoE exports must validate `loads` for vLLM and SGLang with our validator and load back
(dequantized by the registry's numerics) within the scheme's logits bound.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from logit_bounds import assert_logits_within_noise_bound, weight_tensor
from safetensors.torch import load_file, save_file

from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.recipes import check_dialect, default_dialect, make_plan
from quantgate.exporter.schemes import get_scheme
from quantgate.exporter.schemes.apply import quantize
from quantgate.exporter.source import open_source
from quantgate.validators.schemes import COMPRESSED_TENSORS

FIXTURES = Path(__file__).parent / "fixtures" / "compressed_tensors"
CT = COMPRESSED_TENSORS
RECIPES = ("mxfp4", "fp8_block")
#: The fixture models of benchmarks/ct_reference_fixtures.py: dtype tag -> (dtype, tiny llama overrides).
FIXTURE_MODELS = {
    "bf16": (torch.bfloat16, {"hidden": 160, "intermediate": 288, "heads": 5, "kv_heads": 1, "head_dim": 32}),
    "fp16": (torch.float16, {"hidden": 64, "intermediate": 96, "heads": 2, "kv_heads": 1, "head_dim": 32}),
    "fp32": (torch.float32, {"hidden": 64, "intermediate": 96, "heads": 2, "kv_heads": 1, "head_dim": 32}),
}
SIZES = {"gemma4": {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64, "global_head_dim": 64},
         "qwen3_moe": {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64}}


def reference_config() -> dict:
    return json.loads((FIXTURES / "ct_config_groups.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def fixture_export(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """`fixture_export(tag, recipe)` -> (export dir, QuantizeResult) of a tiny llama whose fixture modules
    hold the fixture's source weights (the rest of the model is random). The fixture models' q_proj (160
    or 64 rows) is a non-last shard of vLLM's merged qkv that 128x128 blocks cannot split, so their
    FP8_BLOCK exports fail validation (QG320), as llm-compressor's own output would fail to load; the
    export is kept (`temp_output`) and its bytes are compared all the same."""
    root = tmp_path_factory.mktemp("ct_fixture_exports")
    cache: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(tag: str, recipe: str) -> tuple[Path, object]:
        if (tag, recipe) not in cache:
            dtype, sizes = FIXTURE_MODELS[tag]
            src = root / f"src_{tag}"
            if not src.exists():
                shutil.copytree(tiny_model("llama", layers=1, dtype=dtype, **sizes), src)
                state = load_file(src / "model.safetensors")
                for name, w in load_file(FIXTURES / f"source_{tag}.safetensors").items():
                    assert state[name].shape == w.shape and state[name].dtype == w.dtype, name
                    state[name] = w
                save_file(state, src / "model.safetensors", metadata={"format": "pt"})
            out = root / f"{recipe}_{tag}"
            result = run_quantize(QuantizeRequest(source=str(src), recipe=recipe, dialect=CT, out=out))
            errors = {f.code for f in result.report.findings if f.severity == "error"}
            assert errors == (set() if recipe == "mxfp4" else {"QG320"}), errors
            cache[(tag, recipe)] = (result.output or result.temp_output, result)
        return cache[(tag, recipe)]

    return get


@pytest.mark.parametrize("tag", sorted(FIXTURE_MODELS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_export_bytes_equal_llm_compressor(fixture_export, recipe: str, tag: str) -> None:
    out, _ = fixture_export(tag, recipe)
    reference = load_file(FIXTURES / f"{recipe}_{tag}.safetensors")
    export = open_source(str(out))
    for name, ref in reference.items():
        got = export.tensor(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_group_as_compressed_tensors_020_dumps_it(fixture_export, recipe: str) -> None:
    """The config group equals the 0.20 dump; MXFP4 is the MXFP4A16 preset (the recorded MXFP4 preset's
    weights, BF16 activations)."""
    ours = json.loads((fixture_export("bf16", recipe)[0] / "config.json").read_text())["quantization_config"]
    ref = reference_config()[recipe]
    group, ref_group = ours["config_groups"]["group_0"], ref["config_groups"]["group_0"]
    if recipe == "mxfp4":
        ref_group = {**ref_group, "input_activations": None}
    assert group == ref_group
    shared = ("format", "quant_method", "quantization_status", "version", "kv_cache_scheme", "sparsity_config",
              "transform_config", "global_compression_ratio")
    assert {k: ours[k] for k in shared} == {k: ref[k] for k in shared}
    assert "lm_head" in ours["ignore"]


def test_fp8_block_dialects() -> None:
    """The HF native fp8 stays fp8_block's default; compressed-tensors is its second dialect."""
    assert default_dialect("fp8_block") == "fp8" and default_dialect("mxfp4") == CT
    check_dialect("fp8_block", CT)
    check_dialect("mxfp4", CT)


@pytest.fixture(scope="module")
def moe_export(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ct_moe_exports")
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, recipe: str) -> tuple[Path, Path]:
        if (arch, recipe) not in cache:
            src = tiny_model(arch, **SIZES[arch])
            out = root / f"{arch}_{recipe}"
            assert run_quantize(QuantizeRequest(source=str(src), recipe=recipe, dialect=CT, out=out)).ok
            cache[(arch, recipe)] = (src, out)
        return cache[(arch, recipe)]

    return get


@pytest.mark.parametrize("arch", sorted(SIZES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_export_loads_for_both_engines(moe_export, arch: str, recipe: str) -> None:
    src, out = moe_export(arch, recipe)
    report = json.loads((out / "quantgate-report.json").read_text())
    assert {e: v["status"] for e, v in report["verdicts"].items()} == {"vllm": "loads", "sglang": "loads"}
    plan = make_plan(open_source(str(src)).layout, recipe, dialect=CT)
    experts = [n for n in plan.quantized() if ".experts." in n]
    assert experts and any("self_attn" in n for n in plan.quantized())
    suffix = "weight_packed" if recipe == "mxfp4" else "weight"
    assert open_source(str(out)).info(f"{experts[0]}.{suffix}").dtype == ("U8" if recipe == "mxfp4" else "F8_E4M3")


def scheme_eps(recipe: str) -> float:
    """The CT form's quantize-dequantize error on a 1024x1024 N(0, 1) BF16 matrix."""
    entry = get_scheme({"mxfp4": "MXFP4", "fp8_block": "FP8_BLOCK"}[recipe])
    num = entry.numerics_for(entry.form(CT))
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()
    deq = num.dequantize(*quantize(num, w), dtype=torch.float32)
    return float((deq - w.float()).norm() / w.float().norm())


def test_noise_levels() -> None:
    assert 0.015 < scheme_eps("fp8_block") < 0.035     # as transformers' block FP8
    assert 0.08 < scheme_eps("mxfp4") < 0.2            # 4-bit, power-of-two scales (NVFP4 is ~0.1)


@pytest.mark.parametrize("arch", sorted(SIZES))
@pytest.mark.parametrize("recipe", RECIPES)
def test_dequantized_logits_within_scheme_bound(moe_export, arch: str, recipe: str) -> None:
    src, out = moe_export(arch, recipe)
    source = open_source(str(src))
    eps = scheme_eps(recipe)
    noisy = {weight_tensor(source, n): eps for n in make_plan(source.layout, recipe, dialect=CT).quantized()}
    assert_logits_within_noise_bound(source, src, out, noisy)


def test_fp8_block_shard_vllm_cannot_split_is_reported(tiny_model, tmp_path: Path) -> None:
    """k_proj of 64 rows is a non-last shard of vLLM's merged qkv: `validate_fp8_block_shape` raises
    "Weight output_partition_size = 64 is not divisible by weight quantization block_n = 128" (seen
    loading such an export in vLLM CPU 0.32), so our validator must fail it (QG320), not say loads."""
    src = tiny_model("llama", hidden=128, head_dim=32, kv_heads=2)
    result = run_quantize(QuantizeRequest(source=str(src), recipe="fp8_block", dialect=CT, out=tmp_path / "o"))
    assert not result.ok
    qg320 = [f for f in result.report.findings if f.code == "QG320"]
    assert qg320 and "output_partition_size = 64" in qg320[0].predicted_error
    assert any(n.endswith("self_attn.k_proj") for n in qg320[0].modules)
