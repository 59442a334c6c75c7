"""Recipe `fp8_block`: 128x128 block FP8 in the Hugging Face native `fp8` dialect (its default; the
compressed-tensors spelling is tested in test_ct_new_schemes.py).

The reference producer is transformers' own fine-grained FP8 quantizer (`Fp8Quantize`, the op
`FineGrainedFP8Config` runs); it runs here on the same BF16 weights and every quantized tensor of
our exports must equal its output byte for byte. The exports must validate `loads` for vLLM and
SGLang with our own validator, and load back (dequantized) within the scheme's logits bound.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from logit_bounds import assert_logits_within_noise_bound, weight_tensor

from quantgate.exporter.numerics.common import NumericsError
from quantgate.exporter.numerics.fp8_block import dequantize_fp8_block, quantize_fp8_block
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.recipes import check_dialect, default_dialect, make_plan
from quantgate.exporter.source import open_source, slice_fused
from quantgate.service.cli import main
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Kind

REPO = Path(__file__).resolve().parents[2]
#: Sizes that make every decoder Linear a whole number of 128x128 blocks (attention too, except
#: DeepSeek's MLA projections, which stay ragged on purpose: they must be left BF16 and listed).
BLOCK_SIZES: dict[str, dict] = {
    "llama": {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64, "intermediate": 256},
    "qwen3_moe": {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64},
    "gemma4": {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64, "global_head_dim": 64},
    "deepseek_v3": {"hidden": 128},
    "gemma4_mm": {"hidden": 128, "heads": 2, "kv_heads": 2, "head_dim": 64, "global_head_dim": 64},   # + vision
}
ARCHS = tuple(BLOCK_SIZES)


def transformers_fp8_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' FineGrainedFP8 quantization of one `*.weight` (128x128 blocks, fp32 scales)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    op = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config()))
    return op.convert({"m.weight": weight})


@pytest.fixture(scope="module")
def fp8_export(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """`fp8_export(arch)` -> (source dir, QuantizeResult) of recipe fp8_block, made once per arch."""
    root = tmp_path_factory.mktemp("fp8_block")
    cache: dict[str, tuple[Path, object]] = {}

    def get(arch: str) -> tuple[Path, object]:
        if arch not in cache:
            source = tiny_model(arch, **BLOCK_SIZES[arch])
            req = QuantizeRequest(source=str(source), recipe="fp8_block", dialect="fp8", out=root / arch)
            cache[arch] = (source, run_quantize(req))
        return cache[arch]

    return get


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256), (2, 2, 128, 128)])
def test_numerics_equal_transformers_fp8_quantize(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    w = (torch.randn(shape, generator=gen) * torch.logspace(-4, 2, shape[-1])).bfloat16()
    w[..., :128, :128] = 0                                      # an all-zero block: scale 1.0
    q, scale_inv = quantize_fp8_block(w)
    ref = transformers_fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert scale_inv.shape == (*shape[:-2], shape[-2] // 128, shape[-1] // 128)
    assert torch.equal(q.view(torch.uint8), ref["m.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, ref["m.weight_scale_inv"])
    assert float(scale_inv[..., 0, 0].min()) == 1.0


def test_row_steps_do_not_change_the_bytes(monkeypatch) -> None:
    """Large weights are quantized a few row blocks at a time; the bytes are the same as in one step."""
    from quantgate.exporter.numerics import fp8_block

    w = torch.randn(2, 512, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    whole = quantize_fp8_block(w)
    monkeypatch.setattr(fp8_block, "STEP_ELEMS", 128 * 256)          # one row block per step
    stepped = quantize_fp8_block(w)
    assert torch.equal(whole[0].view(torch.uint8), stepped[0].view(torch.uint8))
    assert torch.equal(whole[1], stepped[1])
    ref = transformers_fp8_quantize(w)
    assert torch.equal(stepped[0].view(torch.uint8), ref["m.weight"].view(torch.uint8))


def test_dequantize_roundtrip_and_ragged_scale_grid() -> None:
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
    q, s = quantize_fp8_block(w)
    err = float((dequantize_fp8_block(q, s, torch.float32) - w.float()).norm() / w.float().norm())
    assert 0.01 < err < 0.05                                       # e4m3: ~31 dB on Gaussian blocks
    # a ragged grid as DeepSeek-V3 ships it (576 rows -> 5 scale rows): the last block covers 64 rows
    q576 = torch.ones(576, 128).to(torch.float8_e4m3fn)
    scales = torch.arange(1, 6, dtype=torch.float32).reshape(5, 1)
    d = dequantize_fp8_block(q576, scales, torch.float32)
    assert d[0, 0] == 1 and d[511, 0] == 4 and d[512, 0] == 5 and d[575, 0] == 5


def test_ragged_weight_refused_as_transformers_leaves_it_unquantized() -> None:
    w = torch.randn(192, 128).bfloat16()
    with pytest.raises(NumericsError, match="does not split into whole 128x128 blocks"):
        quantize_fp8_block(w)
    assert transformers_fp8_quantize(w)["m.weight"].dtype == torch.bfloat16   # passed through unquantized


# --------------------------------------------------------------------------- exports
@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_for_both_engines(fp8_export, arch: str) -> None:
    _, result = fp8_export(arch)
    assert result.ok
    report = json.loads((result.output / "quantgate-report.json").read_text())
    assert {e: v["status"] for e, v in report["verdicts"].items()} == {"vllm": "loads", "sglang": "loads"}
    qc = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert "lm_head" in qc["modules_to_not_convert"]
    assert not (result.output / "hf_quant_config.json").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_export_bytes_equal_transformers_quantizer(fp8_export, arch: str) -> None:
    source_dir, result = fp8_export(arch)
    source, export = open_source(str(source_dir)), open_source(str(result.output))
    plan = make_plan(source.layout, "fp8_block", dialect="fp8")
    quantized = plan.quantized()
    assert quantized
    for name in quantized:
        module = source.layout.modules[name]
        if module.fused is not None:
            weight = slice_fused(source.expert_tensor(module.fused.tensor, module.fused.expert), module.fused)
        else:
            weight = source.tensor(module.tensors["weight"].name)
        ref = transformers_fp8_quantize(weight.contiguous())
        got_w, got_s = export.tensor(f"{name}.weight"), export.tensor(f"{name}.weight_scale_inv")
        assert torch.equal(got_w.view(torch.uint8), ref["m.weight"].view(torch.uint8)), name
        assert torch.equal(got_s, ref["m.weight_scale_inv"]), name
    excluded = json.loads((result.output / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    for name in plan.excluded():       # every BF16 matrix is listed, so neither engine builds it as fp8
        module = source.layout.modules[name]
        weight = module.tensors.get("weight")
        if module.kind is not Kind.EMBEDDING and (module.fused is not None or len(weight.shape) == 2):
            assert name in excluded, name


def test_ragged_modules_left_bf16_and_listed(fp8_export) -> None:
    """DeepSeek's MLA projections (q_a 48 rows, kv_a 40 rows ...) are not whole blocks: BF16, listed."""
    source_dir, result = fp8_export("deepseek_v3")
    plan = make_plan(open_source(str(source_dir)).layout, "fp8_block", dialect="fp8")
    name = "model.layers.0.self_attn.q_a_proj"
    assert not plan.assignments[name].quantized
    assert "does not split into whole 128x128 blocks" in plan.assignments[name].reason
    assert any(name in w for w in plan.warnings)
    export = open_source(str(result.output))
    assert export.info(f"{name}.weight").dtype == "BF16" and f"{name}.weight_scale_inv" not in export.view.tensors
    qc = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert name in qc["modules_to_not_convert"]
    assert "model.layers.1.mlp.experts.0.gate_proj" in plan.quantized()


@pytest.fixture(scope="module")
def fp8_block_eps() -> float:
    """The scheme's noise level: quantize-dequantize error of a 1024x1024 N(0, 1) BF16 matrix."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()
    deq = dequantize_fp8_block(*quantize_fp8_block(w), dtype=torch.float32)
    return float((deq - w.float()).norm() / w.float().norm())


def test_fp8_block_noise_level(fp8_block_eps: float) -> None:
    """Block scales track local amax, so the error is at most per-tensor FP8's (~31 dB)."""
    assert 0.015 < fp8_block_eps < 0.035


@pytest.mark.parametrize("arch", ARCHS)
def test_dequantized_logits_within_scheme_bound(fp8_export, fp8_block_eps: float, arch: str) -> None:
    source_dir, result = fp8_export(arch)
    source = open_source(str(source_dir))
    quantized = make_plan(source.layout, "fp8_block", dialect="fp8").quantized()
    noisy = {weight_tensor(source, n): fp8_block_eps for n in quantized}
    assert_logits_within_noise_bound(source, source_dir, result.output, noisy)


TRANSFORMERS_LOAD_CASES = [
    "llama", "qwen3_moe", "deepseek_v3",
    pytest.param("gemma4", marks=pytest.mark.xfail(strict=True, reason=(
        "transformers 5.24 maps no per-expert names (experts.{e}.gate_proj) onto Gemma4's fused experts: "
        "from_pretrained reports them UNEXPECTED and re-initialises experts.gate_up_proj / down_proj"))),
]


@pytest.mark.parametrize("arch", TRANSFORMERS_LOAD_CASES)
def test_transformers_loads_export_as_our_dequantizer_does(fp8_export, monkeypatch, arch: str) -> None:
    """transformers' own fp8 loader (on CPU it dequantizes: `Fp8Dequantize`) reads the export into
    exactly the weights and logits of our dequantizing loader. Its `validate_environment` demands
    accelerate, which the CPU dequantize path never uses and this venv does not ship: the check is
    answered yes."""
    from transformers.quantizers import quantizer_finegrained_fp8

    from quantgate.exporter.testkit.dequant_load import load_dequantized_model, load_model

    monkeypatch.setattr(quantizer_finegrained_fp8, "is_accelerate_available", lambda: True)
    source_dir, result = fp8_export(arch)
    theirs, ours = load_model(result.output), load_dequantized_model(result.output, source_dir)
    ref_state = ours.state_dict()
    assert {k: v.dtype for k, v in theirs.state_dict().items()} == {k: v.dtype for k, v in ref_state.items()}
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


# --------------------------------------------------------------------------- CLI / API
def test_recipe_dialects() -> None:
    assert default_dialect("fp8_block") == "fp8"
    check_dialect("fp8_block", "compressed-tensors")     # llm-compressor's FP8_BLOCK (test_ct_new_schemes.py)
    with pytest.raises(UsageError, match="cannot be written in the modelopt dialect"):
        check_dialect("fp8_block", "modelopt")
    with pytest.raises(UsageError, match="cannot be written in the fp8 dialect"):
        check_dialect("nvfp4", "fp8")


def test_cli_quantize_fp8_block(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("llama", **BLOCK_SIZES["llama"])
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", str(src), "--recipe", "fp8_block",
                           "--out", str(out), "--progress", "none"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert open_source(str(out)).info("model.layers.0.mlp.down_proj.weight_scale_inv").shape == (1, 2)


def test_cli_fp8_block_as_modelopt_exits_2(tiny_model, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    code = main(["quantize", str(tiny_model("llama", **BLOCK_SIZES["llama"])), "--recipe", "fp8_block",
                 "--dialect", "modelopt", "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "recipe fp8_block cannot be written in the modelopt dialect" in err and "--dialect fp8" in err


def test_job_body_accepts_fp8_block() -> None:
    from pydantic import ValidationError

    from quantgate.service.schemas import JobCreate

    assert JobCreate.model_validate({"source": "org/model", "recipe": "fp8_block"}).dialect == "fp8"
    assert JobCreate.model_validate({"source": "org/model", "recipe": "fp8_block",
                                     "dialect": "compressed-tensors"}).dialect == "compressed-tensors"
    with pytest.raises(ValidationError, match="cannot be written in the modelopt dialect"):
        JobCreate.model_validate({"source": "org/model", "recipe": "fp8_block", "dialect": "modelopt"})


def test_every_dialect_list_names_fp8() -> None:
    """One dialect list (recipes.WRITABLE_DIALECTS) feeds the writers, the CLI, the API schema and the page."""
    import argparse
    from typing import get_args

    from quantgate.exporter.recipes import WRITABLE_DIALECTS
    from quantgate.exporter.writers.registry import WRITERS
    from quantgate.service.api.ui import _dialect_options
    from quantgate.service.commands.quantize import register
    from quantgate.service.schemas import JobCreate

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    cli = next(a.choices for a in sub.choices["quantize"]._actions if a.dest == "dialect")
    schema = {a for a in get_args(JobCreate.model_fields["dialect"].annotation) for a in get_args(a) or (a,)}
    assert set(cli) == set(WRITABLE_DIALECTS) == set(WRITERS) == schema - {type(None)} and "fp8" in WRITERS
    assert set(re.findall(r"<option>([^<]+)</option>", _dialect_options())) == set(WRITERS)    # the job form


def test_cli_model_without_whole_blocks_exits_2(tiny_model, tmp_path: Path, capsys) -> None:
    """At hidden 64 no Linear is a whole 128x128 block: nothing to quantize is bad input, not an export."""
    out = tmp_path / "o"
    code = main(["quantize", str(tiny_model("llama")), "--recipe", "fp8_block", "--out", str(out),
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "recipe fp8_block quantizes no module of this model" in err
