"""Native `fp8` checkpoints (DeepSeek-V3 / Qwen3-MoE-FP8 form) built from real tiny models: one healthy
case per form (loads for both engines) and one broken case per rule, with the verdict each engine gets
(reference formats_beyond_two.md §2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fp8_builders as fb
import pytest
import torch

from quantgate.validators.checkpoint import open_checkpoint
from quantgate.validators.findings import Severity
from quantgate.validators.report import Report, validate, validate_view

#: tiny models whose merged/MoE partitions are whole 128-blocks (like the real models), and the default
#: tiny Qwen3-MoE whose q_proj (64 rows) is not
ARCHS: dict[str, tuple[str, dict]] = {
    "q3": ("qwen3_moe", {"hidden": 128, "heads": 8, "kv_heads": 8}),
    "q3_moe64": ("qwen3_moe", {"hidden": 128, "heads": 8, "kv_heads": 8, "moe_intermediate": 64}),
    "q3_small": ("qwen3_moe", {}),
    "ds": ("deepseek_v3", {"q_lora_rank": 128}),
}
DS = {"exclusion_key": None}          # DeepSeek-V3 ships no exclusion list (its router is BF16 by construction)
LOADS, FAILS, WRONG = "loads", "fails", "loads_wrong"
ERR, WARN = Severity.ERROR, Severity.WARNING

# (id, arch, build kwargs, {engine: status}, {code: severity} that must appear)
CASES: list[tuple[str, str, dict, dict[str, str], dict[str, Severity]]] = [
    ("qwen3-block-healthy", "q3", {}, {"vllm": LOADS, "sglang": LOADS}, {}),
    ("qwen3-block-ignored-layers", "q3", {"exclusion_key": "ignored_layers"}, {"vllm": LOADS, "sglang": LOADS}, {}),
    ("dsv3-block-healthy", "ds", DS, {"vllm": LOADS, "sglang": LOADS}, {}),
    ("dsv3-tensor-static-healthy", "ds", {**DS, "block": None, "activation_scheme": "static"},
     {"vllm": LOADS, "sglang": LOADS}, {}),
    ("qwen3-tensor-dynamic-healthy", "q3", {"block": None}, {"vllm": LOADS, "sglang": LOADS}, {}),
    # BF16 experts under fp8: same shapes, silently cast, scales stay 1.0
    ("dsv3-bf16-experts", "ds", {**DS, "experts": "bf16"}, {"vllm": WRONG, "sglang": WRONG}, {"QG202": ERR}),
    ("qwen3-bf16-experts", "q3", {"experts": "bf16"}, {"vllm": WRONG, "sglang": WRONG}, {"QG202": ERR}),
    # one per-expert entry excludes the whole FusedMoE (experts substring rule, vLLM and SGLang >= 0.5.11)
    ("qwen3-bf16-experts-per-expert-entry", "q3",
     {"experts": "bf16", "mutate": fb.exclude_more("model.layers.0.mlp.experts.0.gate_proj",
                                                   "model.layers.1.mlp.experts.0.gate_proj")},
     {"vllm": LOADS, "sglang": LOADS}, {}),
    # no wildcards in fp8 exclusion lists
    ("qwen3-bf16-experts-wildcard", "q3", {"experts": "bf16", "mutate": fb.exclude_more("model.layers.*.mlp.experts")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG202": ERR}),
    ("dsv3-one-bf16-expert", "ds", {**DS, "mutate": fb.to_bf16("model.layers.1.mlp.experts.2.down_proj")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG403": ERR, "QG202": ERR}),
    ("dsv3-bf16-linear", "ds", {**DS, "mutate": fb.to_bf16("model.layers.1.self_attn.o_proj")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG201": ERR}),
    ("dsv3-bf16-linear-excluded", "ds", {"exclusion_key": "ignored_layers", "exclude": ["model.layers.1.self_attn.o_proj"],
                                         "mutate": fb.to_bf16("model.layers.1.self_attn.o_proj")},
     {"vllm": LOADS, "sglang": LOADS}, {}),
    ("dsv3-quantized-but-excluded", "ds", {"exclusion_key": "ignored_layers", "exclude": ["model.layers.1.self_attn.o_proj"]},
     {"vllm": FAILS, "sglang": WRONG}, {"QG203": ERR}),
    ("dsv3-quantized-lm-head", "ds", {**DS, "mutate": fb.quantize_lm_head}, {"vllm": FAILS, "sglang": FAILS},
     {"QG210": ERR}),
    # scale sanity: only scale tensors are read
    ("dsv3-nan-block-scale", "ds", {**DS, "mutate": fb.fill(float("nan"), "experts.5.up_proj.weight_scale_inv")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG501": ERR}),
    ("dsv3-inf-block-scale", "ds", {**DS, "mutate": fb.fill(float("inf"), "layers.0.mlp.down_proj.weight_scale_inv")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG501": ERR}),
    ("dsv3-zero-block-scale", "ds", {**DS, "mutate": fb.fill(0.0, "experts.2.gate_proj.weight_scale_inv")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG502": ERR}),
    ("dsv3-negative-block-scale", "ds", {**DS, "mutate": fb.fill(-0.5, "self_attn.kv_b_proj.weight_scale_inv")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG502": ERR}),
    ("dsv3-zero-tensor-scale", "ds", {**DS, "block": None, "activation_scheme": "static",
                                      "mutate": fb.fill(0.0, "experts.1.down_proj.input_scale")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG502": ERR}),
    ("dsv3-nan-tensor-weight-scale", "ds", {**DS, "block": None, "activation_scheme": "static",
                                            "mutate": fb.fill(float("nan"), "layers.0.mlp.up_proj.weight_scale")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG501": ERR}),
    ("dsv3-wrong-scale-shape", "ds", {**DS, "mutate": fb.reshape_scale("layers.0.self_attn.o_proj.weight_scale_inv")},
     {"vllm": FAILS, "sglang": FAILS}, {"QG303": ERR}),
    ("dsv3-missing-block-scale", "ds", {**DS, "mutate": fb.drop("experts.4.down_proj.weight_scale_inv")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG301": ERR}),
    ("dsv3-block-scale-dtype", "ds", {**DS, "mutate": fb.retype(torch.uint8, "layers.1.self_attn.o_proj.weight_scale_inv")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG302": ERR}),
    ("dsv3-static-missing-input-scale", "ds", {**DS, "block": None, "activation_scheme": "static",
                                               "mutate": fb.drop("layers.1.self_attn.o_proj.input_scale")},
     {"vllm": WRONG, "sglang": WRONG}, {"QG301": ERR}),
    # config: the engines' startup ValueErrors
    ("qwen3-no-activation-scheme", "q3", {"mutate": fb.qconfig(activation_scheme=None)}, {"vllm": FAILS, "sglang": FAILS},
     {"QG103": ERR}),
    ("qwen3-block-static", "q3", {"mutate": fb.qconfig(activation_scheme="static")}, {"vllm": FAILS, "sglang": FAILS},
     {"QG103": ERR}),
    ("qwen3-block-one-dim", "q3", {"mutate": fb.qconfig(weight_block_size=[128])}, {"vllm": FAILS, "sglang": FAILS},
     {"QG103": ERR}),
    # block alignment: merged q/k shards and the MoE intermediate size must be whole blocks
    ("qwen3-qkv-not-block-aligned", "q3_small", {}, {"vllm": FAILS, "sglang": FAILS}, {"QG320": ERR}),
    ("qwen3-moe-intermediate-64", "q3_moe64", {}, {"vllm": FAILS, "sglang": FAILS}, {"QG320": ERR}),
]


@pytest.fixture(scope="module")
def fp8_export(tiny_model, tmp_path_factory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("fp8")
    counter = iter(range(10_000))

    def build(arch: str, **kwargs) -> Path:
        name, overrides = ARCHS[arch]
        return fb.build_fp8(tiny_model(name, **overrides), root / f"{arch}-{next(counter)}", **kwargs)

    return build


def _summary(report: Report) -> list[str]:
    return [f"{f.severity.value} {f.code} {f.engines} {f.message} | {f.predicted_error}" for f in report.findings]


@pytest.mark.parametrize("case_id,arch,kwargs,statuses,codes", CASES, ids=[c[0] for c in CASES])
def test_fp8_case(fp8_export, case_id: str, arch: str, kwargs: dict, statuses: dict[str, str],
                  codes: dict[str, Severity]) -> None:
    report = validate(str(fp8_export(arch, **kwargs)))
    assert report.dialect == "fp8"
    assert {e: v["status"] for e, v in report.verdicts.items()} == statuses, _summary(report)
    for code, severity in codes.items():
        assert any(f.code == code and f.severity is severity for f in report.findings), _summary(report)
    if all(s == LOADS for s in statuses.values()):
        assert report.ok and not any(f.severity is WARN for f in report.findings), _summary(report)
    # the dialect is modelled: never the "unsupported" / "unrecognised format" rules of other dialects
    assert not {"QG104", "QG190", "QG307"} & {f.code for f in report.findings}, _summary(report)


def test_healthy_block_checkpoint_names_its_scheme(fp8_export) -> None:
    doc = validate(str(fp8_export("ds", **DS))).to_dict()
    assert doc["scheme"] == "FP8_BLOCK" and doc["quantized"] is True
    assert doc["summary"]["by_kind"]["expert"]["quantized"] == 24
    assert doc["summary"]["totals"]["bf16_not_excluded"] == 0


def test_bf16_experts_effect_names_the_engine_mechanism(fp8_export) -> None:
    report = validate(str(fp8_export("ds", **DS, experts="bf16")))
    hit = next(f for f in report.findings if f.code == "QG202")
    assert "Fp8MoEMethod" in hit.predicted_error and "stay 1.0" in hit.predicted_error
    assert hit.modules[0].startswith("model.layers.1.mlp.experts.")


def _validate_at(path: Path, **versions: str) -> Report:
    return validate_view(open_checkpoint(str(path)), engine_versions=versions)


def test_sglang_substring_matching_before_0_5_11(fp8_export) -> None:
    """sglang #23687: `mlp.gate` in the list excluded the dense `mlp.gate_up_proj` (plain substring) up to
    v0.5.10: the float8 gate/up weights load unscaled into a BF16 layer. v0.5.11 (PR #23467) and vLLM do not."""
    path = fp8_export("ds", exclusion_key="modules_to_not_convert", exclude=["lm_head", "model.layers.0.mlp.gate"])
    old = _validate_at(path, sglang="0.5.10")
    assert old.verdicts["sglang"]["status"] == WRONG and old.verdicts["vllm"]["status"] == LOADS, _summary(old)
    hit = next(f for f in old.findings if f.code == "QG203")
    assert hit.engines == ("sglang",) and "model.layers.0.mlp.gate_proj" in hit.modules
    assert "substring" in hit.message
    new = _validate_at(path, sglang="0.5.11")
    newest = validate(str(path))                                   # default: the newest semantics (>= 0.5.11)
    assert {e: v["status"] for e, v in new.verdicts.items()} == {e: v["status"] for e, v in newest.verdicts.items()}
    assert new.verdicts["sglang"]["engine_version"] == "0.5.11" and newest.verdicts["sglang"]["engine_version"] == "0.5.23"
    assert all(v["status"] == LOADS for v in new.verdicts.values()), _summary(new)


def test_kv_scales_load_under_fp8_without_a_kv_scheme(fp8_export) -> None:
    """vLLM/SGLang `Fp8Config` give every Attention an Fp8KVCacheMethod: stored k/v scales are loaded,
    not skipped, so no QG306 "no KV-cache scheme declared" warning (it stays for ModelOpt)."""
    def add_kv(ck: fb.Fp8Checkpoint) -> None:
        for layer in range(2):
            for kind in ("k", "v"):
                ck.tensors[f"model.layers.{layer}.self_attn.{kind}_proj.{kind}_scale"] = torch.tensor(0.02)

    report = validate(str(fp8_export("q3", mutate=add_kv)))
    assert "QG306" not in {f.code for f in report.findings} and report.ok, _summary(report)


def test_entries_that_exclude_nothing_are_reported(fp8_export) -> None:
    """fp8 exclusion lists are names, never patterns: a wildcard or a misspelt name excludes nothing in
    either engine (QG204), while exact names of routers, norms, lm_head and shards are live."""
    path = fp8_export("q3", mutate=fb.exclude_more("model.layers.*.mlp.gate", "model.layers.0.self_attn.q_proj",
                                                   "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
                                                   "model.layers.0.input_layernorm", "model.layers.9.mlp.gate"))
    report = validate(str(path))
    stale = next(f for f in report.findings if f.code == "QG204")
    assert stale.modules == ("model.layers.*.mlp.gate", "model.layers.9.mlp.gate")
    assert stale.engines == ("vllm", "sglang") and stale.severity is WARN
