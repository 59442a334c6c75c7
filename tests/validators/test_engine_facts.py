"""Engine facts per architecture and release (validators/engine_facts.py) and the rules that consult
them: table lookups as data, then real tiny checkpoints whose verdict depends on the fact (routers
built without a quant config, MTP layers skipped, the release chosen with `engine_versions`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import qc_builders as qb
import torch

from quantgate.validators import engine_facts as ef
from quantgate.validators.errors import UsageError
from quantgate.validators.report import validate

LOOKUPS = [
    # (engine, key, architecture, version, expected value)
    ("vllm", ef.UNQUANTIZED_ROLES, "DeepseekV3ForCausalLM", None, frozenset({"router"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "deepseek_v3", None, frozenset({"router"})),          # model_type alias
    ("vllm", ef.UNQUANTIZED_ROLES, "MixtralForCausalLM", None, frozenset({"router"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "GptOssForCausalLM", None, frozenset({"router"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "Llama4ForCausalLM", None, frozenset({"router"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "Gemma4ForConditionalGeneration", None, frozenset({"router"})),
    # Qwen3-MoE's router: quantizable in vLLM from 0.11.0, built without a quant config up to 0.10.2
    ("vllm", ef.UNQUANTIZED_ROLES, "Qwen3MoeForCausalLM", None, frozenset({"shared_expert_gate"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "Qwen3MoeForCausalLM", "0.11.0", frozenset({"shared_expert_gate"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "Qwen3MoeForCausalLM", "0.10.2", frozenset({"router", "shared_expert_gate"})),
    ("sglang", ef.UNQUANTIZED_ROLES, "Qwen3MoeForCausalLM", None, frozenset({"router"})),
    ("sglang", ef.UNQUANTIZED_ROLES, "DeepseekV2ForCausalLM", "0.4.10", frozenset({"router"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "Qwen3_5MoeForConditionalGeneration", None,
     frozenset({"router", "shared_expert_gate"})),
    ("sglang", ef.UNQUANTIZED_ROLES, "Qwen2MoeForCausalLM", None, frozenset({"router", "shared_expert_gate"})),
    ("vllm", ef.UNQUANTIZED_ROLES, "LlamaForCausalLM", None, None),                        # no row: dense
    ("vllm", ef.EXPERTS_AT, "MixtralForCausalLM", None, "block_sparse_moe.experts"),
    ("vllm", ef.EXPERTS_AT, "Gemma4ForCausalLM", "0.30.0", "moe.experts"),
    ("vllm", ef.EXPERTS_AT, "Gemma4ForCausalLM", "0.31.0", "experts"),
    ("sglang", ef.EXPERTS_AT, "Gemma4ForConditionalGeneration", None, "moe.experts"),
    ("vllm", ef.SKIPS_SPEC_LAYERS, "DeepseekV3ForCausalLM", None, True),
    ("sglang", ef.SKIPS_SPEC_LAYERS, "DeepseekV3ForCausalLM", None, True),
    ("vllm", ef.SKIPS_SPEC_LAYERS, "Qwen3MoeForCausalLM", None, None),
    ("vllm", ef.UNKNOWN_NAME, "Qwen3MoeForCausalLM", None, "raises"),
    ("vllm", ef.UNKNOWN_NAME, "DeepseekV3ForCausalLM", None, "keyerror"),
    ("vllm", ef.UNKNOWN_NAME, "GptOssForCausalLM", None, "skips"),
    ("sglang", ef.UNKNOWN_NAME, None, None, "skips"),
    ("vllm", ef.EP_NEEDS_DIVISIBLE_EXPERTS, None, None, False),
    ("sglang", ef.EP_NEEDS_DIVISIBLE_EXPERTS, None, None, True),
]


@pytest.mark.parametrize("engine,key,arch,version,expected", LOOKUPS)
def test_fact_lookup(engine: str, key: str, arch: str | None, version: str | None, expected) -> None:
    assert ef.fact(engine, key, arch, version) == expected


def test_every_row_cites_its_source_and_parses() -> None:
    for f in ef.FACTS:
        assert f.engine in ef.NEWEST and f.key in ef.FACT_KEYS
        assert f.source and ("vllm/" in f.source or "sglang/" in f.source), f
        for bound in (f.since, f.until):
            if bound:
                ef.parse_version(bound)


@pytest.mark.parametrize("text,expected", [("0.5.11", (0, 5, 11)), ("v0.10", (0, 10, 0)), ("0.12.0.post2", (0, 12, 0)),
                                           ("0.32.0rc1", (0, 32, 0)), (" 1.0.0 ", (1, 0, 0))])
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert ef.parse_version(text) == expected


@pytest.mark.parametrize("items", [["vllm"], ["vllm="], ["tensorrt=1.0"], ["vllm=latest"], ["=0.1"]])
def test_bad_engine_versions_are_usage_errors(items: list[str]) -> None:
    with pytest.raises(UsageError):
        ef.parse_engine_versions(items)


def test_engine_versions_default_to_newest() -> None:
    assert ef.parse_engine_versions([]) == ef.NEWEST
    assert ef.parse_engine_versions(["VLLM=v0.10.2"]) == {**ef.NEWEST, "vllm": "0.10.2"}


def test_register_adds_a_version_boundary() -> None:
    """What another module (e.g. SGLang's v0.5.11 dot-boundary matching) does with `register`."""
    key = "test_only_matching"
    rows = (ef.Fact("sglang", key, "substring", "sglang/srt/layers/quantization/utils.py (<= 0.5.10)", until="0.5.11"),
            ef.Fact("sglang", key, "dot-boundary", "sglang PR #23467", since="0.5.11"))
    try:
        ef.register(*rows)
        ef.register(*rows)                                   # idempotent
        assert sum(f.key == key for f in ef.FACTS) == 2
        assert ef.fact("sglang", key, None, "0.5.10") == "substring"
        assert ef.fact("sglang", key, None, "0.5.11") == "dot-boundary"
        assert ef.fact("sglang", key, None) == "dot-boundary"      # newest
        assert ef.fact("vllm", key, None) is None
        with pytest.raises(ValueError):
            ef.register(ef.Fact("trt", key, 1, "x"))
    finally:
        ef.FACTS[:] = [f for f in ef.FACTS if f.key != key]
        ef.lookup.cache_clear()


# ---- the rules consult the facts: real tiny NVFP4 exports -------------------------------------------

def _drop_router_excludes(qc: qb.QCheckpoint) -> None:
    """The export leaves routers BF16 but does not list them (Model-Optimizer PR #1858)."""
    routers = {m.name for m in qc.layout.modules.values() if m.role == "router"}
    qc.exclude[:] = [p for p in qc.exclude if p not in routers]


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("facts")
    counter = iter(range(10_000))
    return lambda arch, mutate=None, **kw: qb.build(tiny_model(arch, **kw), root / f"{arch}-{next(counter)}",
                                                    mutate=mutate)


# (arch, engine versions, expected vLLM verdict, expected SGLang verdict)
ROUTER_CASES = [
    ("deepseek_v3", None, "loads", "loads"),         # vLLM GateLinear / SGLang MoEGate: no quant config
    ("mixtral", None, "loads", "loads"),
    ("llama4", None, "loads", "loads"),
    ("gpt_oss", None, "loads", "loads"),
    ("gemma4", None, "loads", "loads"),
    ("qwen3_moe", None, "fails", "loads"),           # vLLM >= 0.11 quantizes the router; SGLang never does
    ("qwen3_moe", {"vllm": "0.10.2"}, "loads", "loads"),
]


@pytest.mark.parametrize("arch,versions,vllm,sglang", ROUTER_CASES)
def test_bf16_router_not_listed(export, arch: str, versions, vllm: str, sglang: str) -> None:
    report = validate(str(export(arch, _drop_router_excludes)), engine_versions=versions)
    assert report.verdicts["vllm"]["status"] == vllm, report.verdicts
    assert report.verdicts["sglang"]["status"] == sglang, report.verdicts
    qg201 = [f for f in report.findings if f.code == "QG201"]
    assert bool(qg201) == (vllm == "fails")
    if qg201:
        assert qg201[0].engines == ("vllm",) and "Tried to load weights of size" in qg201[0].predicted_error
    expected_vllm = (versions or {}).get("vllm", ef.NEWEST["vllm"])
    assert report.verdicts["vllm"]["engine_version"] == expected_vllm
    assert report.to_dict()["engine_versions"]["vllm"] == expected_vllm


def test_quantized_router_fails_where_the_engine_builds_it_bf16(export) -> None:
    """The converse: DeepSeek's router carries scales, but both engines build it without a quant config."""
    def quantize_router(qc: qb.QCheckpoint) -> None:
        name = next(n for n in qc.tensors if n.endswith("mlp.gate.weight"))
        qc.scalar(name.replace(".weight", ".weight_scale_2"), 0.01)

    report = validate(str(export("deepseek_v3", quantize_router)))
    assert {f.code for f in report.findings if f.severity.value == "error"} >= {"QG209"}
    assert {v["status"] for v in report.verdicts.values()} == {"fails"}


def _add_mtp_layer(qc: qb.QCheckpoint) -> None:
    """DeepSeek-V3 style MTP: layer num_hidden_layers (= 2), stored BF16 and not excluded."""
    qc.config["num_nextn_predict_layers"] = 1
    for name, t in list(qc.tensors.items()):
        if not name.startswith("model.layers.1.") or ".experts." in name or "scale" in name:
            continue
        new = name.replace("model.layers.1.", "model.layers.2.")
        if t.dtype == torch.uint8:                      # NVFP4 packed [out, in/2] -> BF16 [out, in]
            t = torch.zeros(t.shape[0], t.shape[1] * 2, dtype=torch.bfloat16)
        qc.tensors[new] = t
    qc.tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)


def test_mtp_layers_are_skipped_by_the_main_model(export) -> None:
    report = validate(str(export("deepseek_v3", _add_mtp_layer)))
    errors = [f"{f.code} {f.message}" for f in report.findings if f.severity.value == "error"]
    assert errors == [] and {v["status"] for v in report.verdicts.values()} == {"loads"}, errors
    assert report.summary["by_kind"]["other"]["excluded"] > 0          # skipped, counted as not built quantized
    draft = next(f for f in report.findings if f.code == "QG713")         # ... until an MTP draft is enabled
    assert draft.severity.value == "info" and set(draft.engines) == {"vllm", "sglang"}
    assert "model.layers.2.eh_proj" in draft.modules


def test_mtp_layers_of_an_architecture_without_the_fact_are_checked(export) -> None:
    """Control: Qwen3-MoE has no spec-layer row, so the same BF16 extra layer is built quantized (QG201)."""
    def add(qc: qb.QCheckpoint) -> None:
        qc.tensors["mtp.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)

    report = validate(str(export("qwen3_moe", add)))
    assert any(f.code == "QG201" and "mtp.layers.0.self_attn.o_proj" in f.modules for f in report.findings)


def _experts_under_moe(qc: qb.QCheckpoint) -> None:
    """Per-expert names already at `.moe.experts.` (bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4, vllm PR #41206)."""
    for name in [n for n in qc.tensors if ".experts." in n]:
        qc.tensors[name.replace(".experts.", ".moe.experts.")] = qc.tensors.pop(name)


@pytest.mark.parametrize("version,problem,status", [
    ("0.23.0", "moe.moe", "fails"),                 # params_dict[name]: KeyError
    ("0.24.0", "moe.moe", "loads_wrong"),           # `if name not in params_dict: continue`: skipped silently
    ("0.25.0", None, "loads"), ("0.30.0", None, "loads"),
    ("0.31.0", "'model.layers.0.moe'", "fails"),    # AutoWeightsLoader: no module `moe`
    (None, "'model.layers.0.moe'", "fails")])
def test_gemma4_experts_rename_by_vllm_release(export, version: str | None, problem: str | None, status: str) -> None:
    """vLLM < 0.25 renamed `.experts.{e}.` to `.moe.experts.{e}.` unguarded: names already under
    `.moe.experts` became `.moe.moe.experts` (no such parameter); 0.25.0 added the guard; 0.31.0 builds
    the experts at `layers.N.experts`, so `.moe.experts` names have no module. What the loader then does
    changed too: KeyError up to 0.23, silent skip 0.24-0.30, ValueError from 0.31 (all bisected)."""
    report = validate(str(export("gemma4", _experts_under_moe)),
                      engine_versions={"vllm": version} if version else None)
    hits = [f for f in report.findings if f.code == "QG701" and "vllm" in f.engines]
    assert bool(hits) is bool(problem), [f.message for f in report.findings]
    if problem:
        assert problem in hits[0].message + hits[0].predicted_error, (hits[0].message, hits[0].predicted_error)
    assert report.verdicts["vllm"]["status"] == status, report.verdicts["vllm"]
    version = version or ef.NEWEST["vllm"]
    assert report.verdicts["vllm"]["engine_version"] == version
    assert not [f for f in report.findings if f.code == "QG701" and "sglang" in f.engines]   # SGLang guards it


def test_experts_under_another_block(export) -> None:
    """Mixtral experts written under Qwen's `mlp.experts`: both engines build `block_sparse_moe.experts`."""
    def move(qc: qb.QCheckpoint) -> None:
        for name in [n for n in qc.tensors if ".block_sparse_moe.experts." in n]:
            qc.tensors[name.replace(".block_sparse_moe.experts.", ".mlp.experts.")] = qc.tensors.pop(name)

    report = validate(str(export("mixtral", move)))
    hits = {e: f for f in report.findings if f.code == "QG701" for e in f.engines}
    assert "'model.layers.0.mlp'" in hits["vllm"].predicted_error and report.verdicts["vllm"]["status"] == "fails"
    assert report.verdicts["sglang"]["status"] in ("fails", "loads_wrong") and "sglang" in hits


def test_gemma4_expert_layer_name_by_release() -> None:
    assert ef.fact("vllm", ef.INTERNAL_RENAMES, "Gemma4ForCausalLM") == ()
    assert ef.fact("vllm", ef.INTERNAL_RENAMES, "Gemma4ForCausalLM", "0.30.0")
    assert ef.fact("sglang", ef.INTERNAL_RENAMES, "Gemma4ForConditionalGeneration")
