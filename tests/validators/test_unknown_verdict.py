"""Honest uncertainty: a quant_method quantgate does not model gets verdict `unknown` for every engine,
one QG190 warning naming it, and no rule of another dialect; exit 0, or 1 under `--strict`. Every
renderer and the exporter's post-export check say so in their own words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate.service.cli import main
from quantgate.validators.findings import Severity
from quantgate.validators.render import render_html, render_json, render_markdown, render_text
from quantgate.validators.report import validate

#: quant_methods the engines load and quantgate does not model (formats_beyond_two.md §1, §6)
UNMODELLED: dict[str, dict] = {
    "bitsandbytes": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                     "llm_int8_skip_modules": ["lm_head"]},
    "gguf": {},
    "quark": {"export": {"kv_cache_group": []}, "global_quant_config": {}, "exclude": ["lm_head"]},
    "fbgemm_fp8": {"modules_to_not_convert": ["lm_head"], "activation_scale_ub": 1200.0},
    "hqq": {"quant_config": {"weight_quant_params": {"nbits": 4, "group_size": 64}}},
    "torchao": {"quant_type": {"default": {"_type": "Int4WeightOnlyConfig"}}},
}


def _bnb_module(tensors: dict[str, torch.Tensor], module: str) -> None:
    """Rewrite one linear as bitsandbytes stores nf4: packed U8 weight plus its quant-state tensors."""
    out_f, in_f = tensors[f"{module}.weight"].shape
    tensors[f"{module}.weight"] = torch.zeros((out_f * in_f // 2, 1), dtype=torch.uint8)
    tensors[f"{module}.weight.absmax"] = torch.ones(out_f * in_f // 64, dtype=torch.float32)
    tensors[f"{module}.weight.quant_map"] = torch.linspace(-1, 1, 16, dtype=torch.float32)
    tensors[f"{module}.weight.quant_state.bitsandbytes__nf4"] = torch.zeros(64, dtype=torch.uint8)


def unmodelled_checkpoint(src: Path, out: Path, method: str) -> Path:
    """A copy of a real tiny Llama whose config.json declares `method` (bitsandbytes: with nf4 tensors)."""
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, **UNMODELLED[method]}
    (out / "config.json").write_text(json.dumps(config))
    if method == "bitsandbytes":
        shard = out / "model.safetensors"
        tensors = {k: v for k, v in load_file(str(shard)).items()}
        for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
            _bnb_module(tensors, module)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def unmodelled(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("unmodelled")
    return lambda method: unmodelled_checkpoint(tiny_model("llama"),
                                                root / f"{method}-{len(list(root.iterdir()))}", method)


@pytest.mark.parametrize("method", sorted(UNMODELLED))
def test_unmodelled_method_is_unknown_with_one_warning(unmodelled, method: str, capsys) -> None:
    path = unmodelled(method)
    report = validate(str(path))
    assert [(f.code, f.severity) for f in report.findings] == [("QG190", Severity.WARNING)], \
        [f"{f.code} {f.message}" for f in report.findings]
    assert method in report.findings[0].message
    for engine in ("vllm", "sglang"):
        verdict = report.verdicts[engine]
        assert verdict["status"] == "unknown" and verdict["codes"] == ["QG190"]
        assert f"quant_method '{method}'" in verdict["reason"]
    assert report.ok and not report.strict_ok() and report.unknown_engines == ["vllm", "sglang"]
    assert report.dialect == method and report.quantized is True
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path), "--strict"]) == 1
    capsys.readouterr()


def test_warnings_alone_fail_strict(tiny_model, tmp_path: Path) -> None:
    """--strict also turns warnings into failures (here: QG306 k/v scales without a KV scheme)."""
    import qc_builders as qb

    out = qb.build(tiny_model("qwen3_moe"), tmp_path / "kv",
                   mutate=lambda qc: qc.tensors.update({"model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.01)}))
    assert main(["validate", str(out)]) == 0
    assert main(["validate", str(out), "--strict"]) == 1


def test_known_file_failure_outranks_unknown(tiny_model, tmp_path: Path) -> None:
    """A truncated shard fails in any loader, whatever the format: `fails`, not `unknown`."""
    path = unmodelled_checkpoint(tiny_model("llama", max_shard_size="200KB"), tmp_path / "sharded", "gguf")
    shard = sorted(path.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    report = validate(str(path))
    assert {f.code for f in report.findings} == {"QG190", "QG602"}
    assert all(v["status"] == "fails" for v in report.verdicts.values())


def test_renderers_say_unknown_in_their_own_words(unmodelled) -> None:
    report = validate(str(unmodelled("quark")))
    text = render_text(report, color=True)
    assert "\033[35mUNKNOWN" in text and "does not model this format" in text
    assert "UNKNOWN" in render_text(report) and "\033[" not in render_text(report)
    md = render_markdown(report)
    assert "| vllm | **unknown** (not modelled: no prediction) |" in md and "> **unknown** for vllm, sglang" in md
    page = render_html(report)
    assert "#6a4c93" in page and "unknown: not modelled" in page and 'class="unknown-note"' in page
    doc = json.loads(render_json(report))
    assert doc["verdicts"]["sglang"]["status"] == "unknown" and doc["ok"] is True


def test_cli_json_and_output_file(unmodelled, tmp_path: Path, capsys) -> None:
    path = unmodelled("hqq")
    assert main(["validate", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {v["status"] for v in doc["verdicts"].values()} == {"unknown"}
    assert doc["unknown_engines"] == ["vllm", "sglang"]
    assert [f["code"] for f in doc["findings"]] == ["QG190"]
    assert main(["validate", str(path), "--output", str(tmp_path / "r.html"), "--format", "html", "--strict"]) == 1
    assert "verdict unknown for vllm, sglang" in capsys.readouterr().err


def test_exporter_post_export_check_reports_unknown(unmodelled) -> None:
    """The exporter's validation step (`pipeline._validate`) carries the verdicts and names the engines
    it cannot predict in its progress event; it writes the report with the `unknown` verdicts."""
    from quantgate.exporter.pipeline import _validate

    path = unmodelled("torchao")
    events = []
    report = _validate(path, events.append, {})
    done = events[-1]
    assert done.data["unknown_engines"] == ["vllm", "sglang"] and "verdict unknown for vllm, sglang" in done.message
    assert done.data["verdicts"] == {"vllm": "unknown", "sglang": "unknown"}
    written = json.loads((path / "quantgate-report.json").read_text())
    assert written["verdicts"]["vllm"]["status"] == "unknown" and report.unknown_engines == ["vllm", "sglang"]


def test_job_validation_summary_names_unknown_engines(unmodelled) -> None:
    from quantgate.service.worker import validation_summary

    summary = validation_summary(validate(str(unmodelled("fbgemm_fp8"))))
    assert summary["ok"] is True and summary["unknown_engines"] == ["vllm", "sglang"]
    assert summary["warnings"] == 1 and summary["verdicts"]["vllm"]["status"] == "unknown"
