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

from quantgate.exporter import recipes
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
    or 64 rows) is a non-last shard of vLLM's merged qkv that 128x128 blocks cannot split: our plan
    leaves such groups BF16, llm-compressor quantizes them. To compare bytes with its output, the
    FP8_BLOCK exports here are planned as llm-compressor plans them, and so fail validation (QG320), as
    its own output fails to load; the export is kept (`temp_output`) and its bytes are compared."""
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
            with pytest.MonkeyPatch.context() as mp:
                if recipe == "fp8_block":   # as llm-compressor plans it: ragged merged shards quantized
                    mp.setattr(recipes, "_engine_block_problem", lambda *args: None)
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


@pytest.mark.parametrize(("moe_intermediate", "bf16"), [(64, True), (128, False)])
def test_fp8_block_moe_gate_up_rows_must_split_into_blocks(tiny_model, moe_intermediate: int, bf16: bool) -> None:
    """The engines' fp8 MoE refuses gate/up whose rows are not whole 128-row blocks ("The output_size of
    gate's and up's weight = 64 is not divisible by weight quantization block_n = 128"): such experts stay
    BF16 (all experts of the layer, all-or-nothing), with a warning."""
    src = tiny_model("qwen3_moe", hidden=128, heads=2, kv_heads=2, head_dim=64, moe_intermediate=moe_intermediate)
    plan = make_plan(open_source(str(src)).layout, "fp8_block", dialect=CT)
    experts = [n for n in plan.assignments if ".experts." in n]
    assert experts and all(plan.assignments[n].quantized is not bf16 for n in experts)
    assert any("rows of a MoE gate/up do not split" in w for w in plan.warnings) is bf16


def test_fp8_block_leaves_shards_the_engines_cannot_split_bf16(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """k_proj of 64 rows is a non-last shard of vLLM's merged qkv: `validate_fp8_block_shape` raises
    "Weight output_partition_size = 64 is not divisible by weight quantization block_n = 128" (seen
    loading such an export in vLLM CPU 0.32). Our plan leaves q/k/v BF16 with a warning and the export
    loads (before: it was written and failed validation); planned as llm-compressor plans it, our
    validator fails it (QG320), not says loads."""
    src = tiny_model("llama", hidden=128, head_dim=32, kv_heads=2)
    result = run_quantize(QuantizeRequest(source=str(src), recipe="fp8_block", dialect=CT, out=tmp_path / "o"))
    assert result.ok and {e: v["status"] for e, v in result.report.to_dict()["verdicts"].items()} == {
        "vllm": "loads", "sglang": "loads"}
    assert any("k_proj: 64 rows of a shard of the engines' merged qkv_proj" in w for w in result.warnings)
    quantized = make_plan(open_source(str(src)).layout, "fp8_block", dialect=CT).quantized()
    assert not [n for n in quantized if n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")]
    assert any(n.endswith("self_attn.o_proj") for n in quantized) and any(n.endswith("mlp.gate_proj") for n in quantized)

    monkeypatch.setattr(recipes, "_engine_block_problem", lambda *args: None)
    result = run_quantize(QuantizeRequest(source=str(src), recipe="fp8_block", dialect=CT, out=tmp_path / "lc"))
    assert not result.ok
    qg320 = [f for f in result.report.findings if f.code == "QG320"]
    assert qg320 and "output_partition_size = 64" in qg320[0].predicted_error
    assert any(n.endswith("self_attn.k_proj") for n in qg320[0].modules)
