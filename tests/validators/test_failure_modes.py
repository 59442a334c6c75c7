"""The failure modes of issue 2's "must show" list, each reproduced from a real tiny transformers
model (quantized with the project's numerics by `qc_builders`), each found with the right code,
and the healthy exports clean."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import qc_builders as qb

from quantgate.validators.findings import Severity
from quantgate.validators.report import Report, validate


def codes(report: Report, severity: Severity | None = None) -> set[str]:
    return {f.code for f in report.findings if severity is None or f.severity is severity}


def loud(report: Report) -> list[str]:
    """Error and warning findings, formatted for assertion messages."""
    return [f"{f.code} {f.engines} {f.message}" for f in report.findings if f.severity is not Severity.INFO]


@pytest.fixture(scope="module")
def build(tiny_model, tmp_path_factory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("qc")
    counter = iter(range(10_000))

    def make(arch: str, **kwargs) -> Path:
        return qb.build(tiny_model(arch), root / f"{arch}-{next(counter)}", **kwargs)

    return make


@pytest.mark.parametrize("arch,scheme", [("gemma4", "NVFP4"), ("gemma4", "FP8"), ("gemma4_mm", "NVFP4"),
                                         ("qwen3_moe", "NVFP4"), ("mixtral", "NVFP4"), ("llama", "NVFP4")])
def test_healthy_exports_are_clean(build, arch: str, scheme: str) -> None:
    report = validate(str(build(arch, scheme=scheme)))
    assert loud(report) == [], loud(report)
    assert {v["status"] for v in report.verdicts.values()} == {"loads"}
    assert report.quantized and report.scheme == scheme


def test_llm_compressor_nvfp4_checkpoint_is_clean(tiny_model, tmp_path: Path) -> None:
    report = validate(str(qb.build_ct_nvfp4(tiny_model("qwen3_moe"), tmp_path / "ct")))
    assert loud(report) == [], loud(report)
    assert report.dialect == "compressed-tensors" and report.scheme == "NVFP4"


def test_gemma4_fused_experts_left_bf16_under_nvfp4_claim(build) -> None:
    """The headline (ModelOpt 0.41-0.43 on Gemma4): vLLM fails with the size-mismatch error."""
    report = validate(str(build("gemma4", experts="bf16_fused")))
    qg202 = [f for f in report.findings if f.code == "QG202"]
    assert qg202 and "experts left BF16 while config claims NVFP4" in qg202[0].message
    assert {e for f in qg202 for e in f.engines} == {"vllm", "sglang"}
    assert sum(len(f.modules) for f in qg202 if "vllm" in f.engines) == 2 * 8 * 3     # layers x experts x projs
    vllm = report.verdicts["vllm"]
    assert vllm["status"] == "fails"
    assert "The size of tensor a (32) must match the size of tensor b (64)" in vllm["reason"] or \
        "The size of tensor a (64) must match the size of tensor b (128)" in vllm["reason"]
    assert report.summary["by_kind"]["expert"]["bf16_not_excluded"] == 48


def test_experts_excluded_only_under_hf_name(build) -> None:
    """vLLM <= 0.30 and SGLang build Gemma4's experts at `layers.N.moe.experts` (engine_facts
    INTERNAL_RENAMES); vLLM 0.31 builds them at `layers.N.experts`, where the HF-name entry matches."""
    mutate = qb.add_exclude("model.layers.0.experts*", "model.layers.1.experts*")
    path = str(build("gemma4", experts="bf16_fused", mutate=mutate))
    report = validate(path, engine_versions={"vllm": "0.30.0"})
    assert "QG205" in codes(report, Severity.ERROR)
    assert "QG202" not in codes(report)
    assert "QG204" not in codes(report), "the HF-name entries are explained by QG205, not repeated as stale"
    finding = next(f for f in report.findings if f.code == "QG205")
    assert "moe.experts" in finding.message and "vllm" in finding.engines
    assert report.verdicts["vllm"]["status"] == "fails"
    newest = validate(path)
    assert newest.verdicts["vllm"]["status"] == "loads" and newest.verdicts["sglang"]["status"] == "fails"
    assert {e for f in newest.findings if f.code == "QG205" for e in f.engines} == {"sglang"}


def test_engine_name_wildcard_makes_bf16_experts_load(build) -> None:
    """The fix the finding suggests: a wildcard that covers both spellings."""
    mutate = qb.add_exclude("*layers.0.*experts*", "*layers.1.*experts*")
    report = validate(str(build("gemma4", experts="bf16_fused", mutate=mutate)))
    assert not codes(report, Severity.ERROR), loud(report)


def test_router_carrying_scales(build) -> None:
    def mutate(qc: qb.QCheckpoint) -> None:
        qc.scalar("model.layers.0.router.proj.input_scale", 0.01)

    report = validate(str(build("gemma4", mutate=mutate)))
    finding = next(f for f in report.findings if f.code == "QG209")
    assert finding.severity is Severity.ERROR and finding.modules == ("model.layers.0.router.proj",)
    assert "router.proj.input_scale" in finding.predicted_error
    assert report.verdicts["vllm"]["status"] == "fails"


def test_qwen_router_with_scales_excluded(build) -> None:
    def mutate(qc: qb.QCheckpoint) -> None:
        qc.scalar("model.layers.1.mlp.gate.weight_scale_2", 1e-4)

    report = validate(str(build("qwen3_moe", mutate=mutate)))
    assert "QG209" in codes(report, Severity.ERROR)


def test_missing_input_scale_on_one_expert(build) -> None:
    report = validate(str(build("qwen3_moe", mutate=qb.drop("layers.1.mlp.experts.3.down_proj.input_scale"))))
    finding = next(f for f in report.findings if f.code == "QG301")
    assert finding.modules == ("model.layers.1.mlp.experts.3.down_proj",)
    assert "QG106" not in codes(report), "one module missing a scale is not a scheme contradiction"
    assert report.verdicts["vllm"]["status"] == "loads_wrong"


def test_zero_input_scale(build) -> None:
    report = validate(str(build("gemma4", mutate=qb.set_scalar(0.0, "layers.1.experts.2.gate_proj.input_scale"))))
    finding = next(f for f in report.findings if f.code == "QG502")
    assert finding.modules == ("model.layers.1.experts.2.gate_proj.input_scale",)
    assert report.verdicts["sglang"]["status"] == "loads_wrong"
    assert "QG502" not in codes(validate(str(build("gemma4", mutate=qb.set_scalar(
        0.0, "layers.1.experts.2.gate_proj.input_scale"))), deep=False))


def test_gate_up_global_scales_differ(build) -> None:
    def mutate(qc: qb.QCheckpoint) -> None:
        name = "model.layers.0.experts.5.up_proj.weight_scale_2"
        qc.scalar(name, float(qc.tensors[name]) * 1.5)

    report = validate(str(build("gemma4", mutate=mutate)))
    finding = next(f for f in report.findings if f.code == "QG404")
    assert finding.modules == ("model.layers.0.experts.5",)
    assert "w1_weight_scale_2 must match w3_weight_scale_2" in finding.predicted_error


def test_stale_exclude_entry(build) -> None:
    report = validate(str(build("qwen3_moe", mutate=qb.add_exclude("model.layers.7.mlp.gate"))))
    finding = next(f for f in report.findings if f.code == "QG204")
    assert finding.severity is Severity.WARNING and finding.modules == ("model.layers.7.mlp.gate",)
    assert set(finding.engines) == {"vllm", "sglang"}
    assert not codes(report, Severity.ERROR)


def test_mlp_gate_excludes_gate_up_proj_by_substring(build) -> None:
    """vLLM's substring rule: `model.layers.0.mlp.gate` excludes the fused `mlp.gate_up_proj`."""
    report = validate(str(build("gemma4", mutate=qb.add_exclude("model.layers.0.mlp.gate"))))
    finding = next(f for f in report.findings if f.code == "QG206")
    assert finding.engines == ("vllm",)
    assert set(finding.modules) == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    assert report.verdicts["vllm"]["status"] == "fails"
    # SGLang has no substring rule: for it the entry just matches nothing
    assert report.verdicts["sglang"]["status"] == "loads"
    assert any(f.code == "QG204" and f.engines == ("sglang",) for f in report.findings)


def test_index_names_a_missing_shard(build) -> None:
    out = build("qwen3_moe", shards=3)
    missing = sorted(out.glob("*.safetensors"))[1]
    missing.unlink()
    report = validate(str(out))
    finding = next(f for f in report.findings if f.code == "QG601")
    assert missing.name in finding.modules
    assert report.verdicts["vllm"]["status"] == "fails"


def test_truncated_shard(build) -> None:
    out = build("qwen3_moe", shards=3)
    shard = sorted(out.glob("*.safetensors"))[2]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    report = validate(str(out))
    assert "QG602" in codes(report, Severity.ERROR)
    assert report.verdicts["sglang"]["status"] == "fails"
