"""GPT-OSS's routed experts written in its native `mxfp4` form (exporter.writers.mxfp4_native).

Checked here: the export holds exactly the six fused tensors per MoE layer the engines' `gpt_oss.py`
loaders read and our validator predicts `loads` for both engines; every expert's blocks are our MXFP4
numerics applied to that expert's [out, in] matrix (rows in the source's interleaved order); the
dequantizing loader gives logits inside the scheme's bound; transformers' own mxfp4 loader reads the
export to the same weights as our dequantizer (optional: needs `accelerate`); what the form cannot hold
is refused before a weight is read.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from logit_bounds import assert_logits_within_noise_bound, weight_tensor
from safetensors.torch import load_file

from quantgate.exporter.numerics.mxfp4 import dequantize_mxfp4, mxfp4_from_native, quantize_mxfp4_native
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.recipes import make_plan
from quantgate.exporter.source import open_source
from quantgate.service.cli import main as cli_main
from quantgate.validators.errors import UnsupportedArchitectureError
from quantgate.validators.layout import Kind

SIX = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
       "down_proj_blocks", "down_proj_scales", "down_proj_bias")


@pytest.fixture(scope="module")
def native(tiny_model, tmp_path_factory) -> tuple[Path, object]:
    source = tiny_model("gpt_oss")
    result = run_quantize(QuantizeRequest(source=str(source), recipe="mxfp4", dialect="mxfp4",
                                          out=tmp_path_factory.mktemp("mxfp4") / "out", device="cpu"))
    return source, result


def _moe_prefixes(source) -> list[str]:
    return sorted({m.fused.tensor.rpartition(".")[0] for m in source.layout.by_kind(Kind.EXPERT)})


def test_native_export_holds_the_six_fused_tensors_and_loads(native) -> None:
    source_dir, result = native
    assert result.ok, [f.message for f in result.report.findings]
    verdicts = result.report.to_dict()["verdicts"]
    assert {e: v["status"] for e, v in verdicts.items()} == {"vllm": "loads", "sglang": "loads"}
    source, export = open_source(str(source_dir)), open_source(str(result.output))
    config = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "mxfp4" and "lm_head" in config["modules_to_not_convert"]
    assert not (result.output / "hf_quant_config.json").exists()
    for prefix in _moe_prefixes(source):
        e, h, two_i = source.info(f"{prefix}.gate_up_proj").shape
        i = two_i // 2
        want = {"gate_up_proj_blocks": ("U8", [e, 2 * i, h // 32, 16]), "gate_up_proj_scales": ("U8", [e, 2 * i, h // 32]),
                "gate_up_proj_bias": ("BF16", [e, 2 * i]), "down_proj_blocks": ("U8", [e, h, i // 32, 16]),
                "down_proj_scales": ("U8", [e, h, i // 32]), "down_proj_bias": ("BF16", [e, h])}
        for name in SIX:
            info = export.view.tensors[f"{prefix}.{name}"]
            assert (info.dtype, list(info.shape)) == want[name], name
        assert f"{prefix}.gate_up_proj" not in export.view.tensors
    attention = list(source.layout.by_kind(Kind.ATTENTION))
    assert attention and all(export.view.tensors[m.tensors["weight"].name].dtype == "BF16" for m in attention)


def test_each_expert_is_its_own_matrix_quantized(native) -> None:
    source_dir, result = native
    source = open_source(str(source_dir))
    out = load_file(str(result.output / "model.safetensors"))
    for prefix in _moe_prefixes(source):
        for proj in ("gate_up_proj", "down_proj"):
            w = source.tensor(f"{prefix}.{proj}")            # [E, in, out], gate/up interleaved along out
            for e in range(w.shape[0]):
                blocks, scales = quantize_mxfp4_native(w[e].t().contiguous())
                assert torch.equal(out[f"{prefix}.{proj}_blocks"][e], blocks), (proj, e)
                assert torch.equal(out[f"{prefix}.{proj}_scales"][e], scales), (proj, e)
            assert torch.equal(out[f"{prefix}.{proj}_bias"], source.tensor(f"{prefix}.{proj}_bias"))


def test_streaming_expert_by_expert_gives_the_same_bytes(native, tmp_path: Path, monkeypatch) -> None:
    from quantgate.exporter.writers import bmm_experts

    source_dir, whole = native
    monkeypatch.setattr(bmm_experts, "WHOLE_READ_MAX", 0)
    streamed = run_quantize(QuantizeRequest(source=str(source_dir), recipe="mxfp4", dialect="mxfp4",
                                            out=tmp_path / "out", device="cpu"))
    assert streamed.ok
    assert (streamed.output / "model.safetensors").read_bytes() == (whole.output / "model.safetensors").read_bytes()


def test_dequantized_logits_within_the_scheme_bound(native) -> None:
    source_dir, result = native
    source = open_source(str(source_dir))
    w = source.tensor(_moe_prefixes(source)[0] + ".gate_up_proj")[0].t().contiguous().float()
    deq = dequantize_mxfp4(*mxfp4_from_native(*quantize_mxfp4_native(w)), dtype=torch.float32)
    eps = float((deq - w).norm() / w.norm())
    noisy = {weight_tensor(source, n): eps for n in make_plan(source.layout, "mxfp4", dialect="mxfp4").quantized()}
    assert noisy and all(t.endswith(("gate_up_proj", "down_proj")) for t in noisy)
    assert_logits_within_noise_bound(source, source_dir, result.output, noisy)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' mxfp4 loader needs accelerate (not a quantgate dependency)")
def test_transformers_reads_the_export_as_our_dequantizer_does(native) -> None:
    """An independent reader: transformers' Mxfp4HfQuantizer (dequantizing to BF16 on a CPU) gives every
    expert weight bit-equal to our dequantizer's."""
    import transformers

    source_dir, result = native
    model = transformers.AutoModelForCausalLM.from_pretrained(str(result.output), dtype=torch.bfloat16)
    out = load_file(str(result.output / "model.safetensors"))
    for layer, block in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{proj}"
            ours = dequantize_mxfp4(*mxfp4_from_native(out[key + "_blocks"], out[key + "_scales"])).transpose(-1, -2)
            assert torch.equal(getattr(block.mlp.experts, proj).detach(), ours), key


@pytest.mark.parametrize(("arch", "args", "message"), [
    ("qwen3_moe", [], "native mxfp4 form .* is loaded for GptOssForCausalLM only, not Qwen3MoeForCausalLM"),
    ("llama4", [], "not Llama4ForCausalLM"),
    ("gpt_oss", ["--exclude", "*.layers.0.mlp.experts.*"], "every MoE layer MXFP4, but 24 expert module"),
])
def test_what_the_native_form_cannot_hold_is_refused(tiny_model, tmp_path: Path, capsys, arch: str,
                                                    args: list[str], message: str) -> None:
    rc = cli_main(["quantize", str(tiny_model(arch)), "--recipe", "mxfp4", "--dialect", "mxfp4",
                   "--out", str(tmp_path / "out"), "--progress", "none", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_the_plan_keeps_every_linear_bf16_under_the_native_dialect(tiny_model) -> None:
    source = open_source(str(tiny_model("gpt_oss")))
    plan = make_plan(source.layout, "mxfp4", dialect="mxfp4")
    kinds = {source.layout.modules[n].kind for n in plan.quantized()}
    assert kinds == {Kind.EXPERT}
    reasons = {plan.assignments[m.name].reason for m in source.layout.by_kind(Kind.ATTENTION)}
    assert reasons == {"the mxfp4 dialect quantizes routed experts only (vLLM and SGLang build every Linear BF16 "
                       "under mxfp4)"}
    with pytest.raises(UnsupportedArchitectureError):
        from quantgate.exporter.writers.mxfp4_native import check_native_plan
        check_native_plan(source, make_plan(source.layout, "mxfp4", exclude=["*experts*"], dialect="mxfp4"))
