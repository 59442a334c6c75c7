"""Data-driven pass/fail cases per rule: each case mutates a healthy ModelOpt export of a real tiny
model (qc_builders) and names the code that must (or must not) appear. The healthy export of each
architecture is the shared "pass" case (test_failure_modes checks it is clean)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import qc_builders as qb
import torch

from quantgate.validators.findings import Severity
from quantgate.validators.report import validate
from quantgate.validators.rules import load_rules

Mutation = Callable[[qb.QCheckpoint], None]


def _config(**changes) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        qc.config.update(changes)
        if "quantization_config" in changes:
            qc.extra["keep_config_keys"] = ("quantization_config",)
    return mutate


def _hf(**quantization) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        nested = {"producer": {"name": "modelopt", "version": "0.47.0"},
                  "quantization": {"quant_algo": qc.quant_algo, "kv_cache_quant_algo": None, "group_size": 16,
                                   "exclude_modules": sorted(qc.exclude)}}
        nested["quantization"].update(quantization)
        qc.hf_quant_config = nested
    return mutate


def _only_hf(**quantization) -> Mutation:
    """No config.json quantization_config: the legacy hf_quant_config.json-only path."""
    def mutate(qc: qb.QCheckpoint) -> None:
        _hf(**quantization)(qc)
        qc.extra["keep_config_keys"] = ("quantization_config",)
    return mutate


def _retype(fragment: str, dtype: torch.dtype) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        name = qb.first(qc, fragment)
        qc.tensors[name] = qc.tensors[name].view(torch.uint8).to(dtype) if qc.tensors[name].dtype != dtype else \
            qc.tensors[name]
    return mutate


def _reshape(fragment: str) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        name = qb.first(qc, fragment)
        t = qc.tensors[name]
        qc.tensors[name] = t.reshape(t.shape[0] * 2, t.shape[1] // 2)
    return mutate


def _add(name: str, tensor: torch.Tensor) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        qc.tensors[name] = tensor
    return mutate


def _unquantize(*fragments: str) -> Mutation:
    """Replace a quantized module by a BF16 weight of its logical shape (no scales)."""
    def mutate(qc: qb.QCheckpoint) -> None:
        module = qb.first(qc, *fragments, ".weight_scale_2").rsplit(".", 1)[0]
        packed = qc.tensors[f"{module}.weight"]
        for suffix in ("weight_scale", "weight_scale_2", "input_scale"):
            qc.tensors.pop(f"{module}.{suffix}", None)
        qc.tensors[f"{module}.weight"] = torch.zeros(packed.shape[0], packed.shape[1] * 2, dtype=torch.bfloat16)
    return mutate


def _drop_all(suffix: str) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        for n in [n for n in qc.tensors if n.endswith("." + suffix)]:
            del qc.tensors[n]
    return mutate


def _scale_all(suffix: str, factor: float) -> Mutation:
    def mutate(qc: qb.QCheckpoint) -> None:
        for n in [n for n in qc.tensors if n.endswith("." + suffix)]:
            qc.tensors[n] = qc.tensors[n] * factor
    return mutate


def _rename_experts_reversed(qc: qb.QCheckpoint) -> None:
    for n in [n for n in qc.tensors if ".mlp.experts.0.down_proj." in n]:
        qc.tensors[n.replace(".experts.0.down_proj.", ".experts.down_proj.0.")] = qc.tensors.pop(n)


def _drop_expert(qc: qb.QCheckpoint) -> None:
    for n in [n for n in qc.tensors if ".mlp.experts.6.up_proj." in n]:
        del qc.tensors[n]


# (code, arch, mutation, severity expected or None for "must not appear")
CASES: list[tuple[str, str, Mutation | None, Severity | None]] = [
    ("QG101", "qwen3_moe", lambda qc: (qc.extra.update(keep_config_keys=("quantization_config",)),
                                       setattr(qc, "write_hf_quant_config", False)), Severity.ERROR),
    ("QG101", "qwen3_moe", None, None),
    ("QG102", "qwen3_moe", _hf(exclude_modules=["lm_head"]), Severity.WARNING),
    ("QG102", "qwen3_moe", _hf(), None),
    ("QG103", "qwen3_moe", _config(quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4",
                                                        "ignore": "lm_head"}), Severity.ERROR),
    ("QG104", "qwen3_moe", _only_hf(quant_algo="W4A16_NVFP4"), Severity.ERROR),
    ("QG104", "qwen3_moe", _only_hf(), None),
    ("QG105", "qwen3_moe", _only_hf(group_size=32), Severity.ERROR),
    ("QG106", "qwen3_moe", _drop_all("input_scale"), Severity.ERROR),
    ("QG201", "qwen3_moe", _unquantize("layers.0.self_attn.o_proj"), Severity.ERROR),
    ("QG201", "qwen3_moe", qb.chain(_unquantize("layers.0.self_attn.o_proj"),
                                    qb.add_exclude("model.layers.0.self_attn.o_proj")), None),
    ("QG203", "qwen3_moe", qb.add_exclude("model.layers.1.self_attn.o_proj"), Severity.ERROR),
    ("QG207", "qwen3_moe", qb.add_exclude("model.layers.0.self_attn.q_proj"), Severity.ERROR),
    ("QG207", "qwen3_moe", _unquantize("layers.1.self_attn.v_proj"), Severity.ERROR),
    ("QG210", "qwen3_moe", lambda qc: qc.exclude.remove("lm_head"), Severity.ERROR),
    ("QG210", "gemma4", lambda qc: qc.exclude.remove("lm_head"), None),     # tied: no lm_head tensor
    ("QG302", "qwen3_moe", _retype("layers.0.self_attn.q_proj.weight_scale", torch.uint8), Severity.ERROR),
    ("QG303", "qwen3_moe", _reshape("layers.0.self_attn.o_proj.weight_scale"), Severity.ERROR),
    ("QG305", "qwen3_moe", _add("model.layers.0.self_attn.q_proj.weight_zero_point", torch.zeros(8, dtype=torch.int32)),
     Severity.ERROR),
    ("QG306", "qwen3_moe", _add("model.layers.0.self_attn.k_proj.k_scale", torch.tensor(0.01)), Severity.WARNING),
    ("QG401", "qwen3_moe", _config(num_experts=4, num_local_experts=4), Severity.ERROR),
    ("QG402", "qwen3_moe", _drop_expert, Severity.ERROR),
    ("QG403", "qwen3_moe", _unquantize("layers.0.mlp.experts.2.down_proj"), Severity.ERROR),
    ("QG405", "qwen3_moe", _rename_experts_reversed, Severity.ERROR),
    ("QG501", "qwen3_moe", qb.set_scalar(float("nan"), "layers.0.self_attn.q_proj.input_scale"), Severity.ERROR),
    ("QG503", "qwen3_moe", qb.set_scalar(5.0, "layers.0.mlp.experts.4.gate_proj.input_scale"), Severity.WARNING),
    ("QG504", "qwen3_moe", _scale_all("weight_scale_2", 1e7), Severity.ERROR),
    ("QG610", "qwen3_moe", _config(hidden_size=96), Severity.ERROR),
    ("QG611", "qwen3_moe", _config(num_hidden_layers=5), Severity.ERROR),
    ("QG209", "gemma4", qb.set_scalar(1e-3, "layers.1.router.proj.weight"), None),   # replaced weight, no scales
]


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory) -> Callable[[str, Mutation | None], Path]:
    root = tmp_path_factory.mktemp("rules")
    counter = iter(range(10_000))
    return lambda arch, mutation: qb.build(tiny_model(arch), root / f"{arch}-{next(counter)}", mutate=mutation)


@pytest.mark.parametrize("code,arch,mutation,severity", CASES,
                         ids=[f"{c[0]}-{'fail' if c[3] else 'pass'}-{i}" for i, c in enumerate(CASES)])
def test_rule_case(export, code: str, arch: str, mutation: Mutation | None, severity: Severity | None) -> None:
    report = validate(str(export(arch, mutation)))
    hits = [f for f in report.findings if f.code == code]
    if severity is None:
        assert not hits, [f.message for f in hits]
    else:
        assert hits and hits[0].severity is severity, [f"{f.code} {f.message}" for f in report.findings]
        if severity is Severity.ERROR and hits[0].effect is not None:
            assert all(report.verdicts[e]["status"] != "loads" for e in hits[0].engines)


def test_every_rule_is_documented() -> None:
    rules = load_rules()
    assert len(rules) >= 40
    for code, r in rules.items():
        assert code.startswith("QG") and len(code) == 5
        doc = r.doc
        assert "Why:" in doc and "Fix:" in doc, code
        assert any(k in doc.lower() for k in ("invariant", "vllm", "sglang", "engine", "safetensors")), code


def test_config_json_written_by_builder_is_valid_json(export) -> None:
    out = export("qwen3_moe", None)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
