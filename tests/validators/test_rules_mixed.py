"""MIXED_PRECISION checkpoints (invariant 24): data-driven pass/fail cases on real `auto` exports.

A healthy mixed export (NVFP4 + FP8 + BF16 at 6.0 effective bits) of each tiny model is made once
with the product exporter; each case copies it, edits the quantization config in both files the
same way (so QG102 stays quiet), and names the code that must (or must not) appear.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quantgate.validators.findings import Severity
from quantgate.validators.report import validate

Edit = Callable[[dict[str, Any], dict[str, Any]], None]     # (quantization section, auto_plan.json)
MODELS: dict[str, dict[str, Any]] = {"llama": {"layers": 4}, "qwen3_moe": {"layers": 4}}


@pytest.fixture(scope="module")
def mixed_export(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable:
    from quantgate.exporter.pipeline import QuantizeRequest, run_quantize

    root = tmp_path_factory.mktemp("mixed")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            req = QuantizeRequest(source=str(tiny_model(arch, **MODELS[arch])), recipe="auto", bits=6.0,
                                  out=root / arch, device="cpu", calib_samples=4, calib_seq_len=32,
                                  calib_batch_size=2, score_samples=4)
            result = run_quantize(req)
            assert result.ok and len(result.auto["by_scheme"]) == 3, result.auto
            cache[arch] = result.output
        return cache[arch]

    return get


def _edited(src: Path, dest: Path, edit: Edit | None) -> Path:
    shutil.copytree(src, dest)
    if edit is None:
        return dest
    plan = json.loads((dest / "auto_plan.json").read_text())
    hf_path, config_path = dest / "hf_quant_config.json", dest / "config.json"
    hf, config = json.loads(hf_path.read_text()), json.loads(config_path.read_text())
    edit(hf["quantization"], plan)
    flat = config["quantization_config"]
    flat["quantized_layers"] = hf["quantization"].get("quantized_layers")
    flat["ignore"] = hf["quantization"].get("exclude_modules", [])
    if "exclude_modules" not in hf["quantization"]:
        flat["ignore"] = []
    hf_path.write_text(json.dumps(hf))
    config_path.write_text(json.dumps(config))
    return dest


def _modelopt_form(quant: dict, plan: dict) -> None:
    """What ModelOpt itself writes for a mixed plan: no exclude list; unlisted modules are BF16."""
    quant.pop("exclude_modules")


def _unlist(fragment: str) -> Edit:
    def edit(quant: dict, plan: dict) -> None:
        name = next(n for n in sorted(quant["quantized_layers"]) if fragment in n)
        del quant["quantized_layers"][name]
    return edit


def _other_algo(fragment: str) -> Edit:
    """Give one listed module the other algo than its fused siblings (and its bytes)."""
    def edit(quant: dict, plan: dict) -> None:
        name = next(n for n in sorted(quant["quantized_layers"]) if fragment in n)
        algo = quant["quantized_layers"][name]["quant_algo"]
        quant["quantized_layers"][name] = {"quant_algo": "FP8"} if algo == "NVFP4" else \
            {"quant_algo": "NVFP4", "group_size": 16}
    return edit


def _list_a_bf16_module(quant: dict, plan: dict) -> None:
    """List a module the plan kept BF16 as FP8, with ModelOpt's empty exclude list."""
    name = next(n for n, scheme in sorted(plan["modules"].items()) if scheme is None)
    quant.pop("exclude_modules")
    quant["quantized_layers"][name] = {"quant_algo": "FP8"}


def _set_layers(value: Any) -> Edit:
    def edit(quant: dict, plan: dict) -> None:
        quant["quantized_layers"] = value
    return edit


def _add_layer(name: str, algo: str) -> Edit:
    def edit(quant: dict, plan: dict) -> None:
        quant["quantized_layers"][name] = {"quant_algo": algo}
    return edit


# (code, arch, edit, expected severity or None for "must not appear")
CASES: list[tuple[str, str, Edit | None, Severity | None]] = [
    ("QG211", "llama", None, None),
    ("QG212", "qwen3_moe", None, None),
    ("QG201", "llama", _modelopt_form, None),
    ("QG202", "qwen3_moe", _modelopt_form, None),
    ("QG210", "qwen3_moe", _modelopt_form, None),
    ("QG203", "llama", _unlist("self_attn"), Severity.ERROR),                 # quantized but not listed
    ("QG203", "qwen3_moe", _unlist("mlp.experts.5.down_proj"), None),   # the engines resolve it by layer,
    ("QG212", "qwen3_moe", _unlist("mlp.experts.5.down_proj"), Severity.WARNING),   # but it is unlisted
    ("QG211", "llama", _other_algo("self_attn.k_proj"), Severity.ERROR),      # fused shards disagree
    ("QG211", "qwen3_moe", _other_algo("mlp.experts.3.up_proj"), Severity.ERROR),
    ("QG201", "llama", _list_a_bf16_module, Severity.ERROR),                  # listed but stored BF16
    ("QG212", "llama", _set_layers({}), Severity.ERROR),
    ("QG212", "llama", _add_layer("model.layers.99.mlp.down_proj", "FP8"), Severity.WARNING),
    ("QG212", "qwen3_moe", _add_layer("model.layers.0.mlp.experts", "NVFP4"), None),   # a container key
]


@pytest.mark.parametrize("code,arch,edit,severity", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'fail' if c[3] else 'pass'}-{i}" for i, c in enumerate(CASES)])
def test_mixed_rule_case(mixed_export: Callable, tmp_path: Path, code: str, arch: str, edit: Edit | None,
                         severity: Severity | None) -> None:
    report = validate(str(_edited(mixed_export(arch), tmp_path / "ckpt", edit)))
    hits = [f for f in report.findings if f.code == code]
    if severity is None:
        assert not hits, [f.message for f in hits]
        if edit is None or edit is _modelopt_form:
            assert report.ok, [f"{f.code} {f.message}" for f in report.findings]
    else:
        assert hits and hits[0].severity is severity, [f"{f.code} {f.message}" for f in report.findings]
        if severity is Severity.ERROR:
            assert not report.ok
            assert all(report.verdicts[e]["status"] != "loads" for e in hits[0].engines)


def test_mixed_algo_finding_names_the_engine_error(mixed_export: Callable, tmp_path: Path) -> None:
    report = validate(str(_edited(mixed_export("llama"), tmp_path / "ckpt", _other_algo("self_attn.k_proj"))))
    finding = next(f for f in report.findings if f.code == "QG211" and "vllm" in f.engines)
    assert "Mixed quant_algo within fused layer" in finding.predicted_error
    assert "qkv_proj" in finding.message and len(finding.modules) == 1
