"""The bug-report corpus (issue 10, "Must show"): every case's verdict per engine is what the engine did.

Each case of corpus_cases.py is written as a tiny real checkpoint (corpus_formats.materialize) and
validated in-process; cases that pin an engine version or a deployment shape, and a few others, go
through the real `quantgate validate --format json` subprocess. Every case must pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from corpus_cases import CASES
from corpus_formats import materialize
from corpus_spec import Case

from quantgate.validators.report import validate

ROOT = Path(__file__).resolve().parents[3]
#: cases that also run through the CLI subprocess (besides every case with `cli` flags)
CLI_CASES = (
    "modelopt-nvfp4-qwen3moe-release",
    "modelopt-nvfp4-qwen3moe-router-unlisted",
    "modelopt-nvfp4-gemma4-zero-expert-input-scale",
    "bitsandbytes-nf4-unknown",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[Case], Path]:
    root = tmp_path_factory.mktemp("corpus")
    cache_: dict[str, Path] = {}

    def get(case: Case) -> Path:
        if case.id not in cache_:
            cache_[case.id] = materialize(case, root / case.id)
        return cache_[case.id]

    return get


def _statuses(verdicts: dict, engines) -> dict[str, str]:
    return {e: verdicts[e]["status"] for e in engines}


def _explain(report: dict) -> str:
    return "\n".join(
        f"  {f['code']} {f['severity']} {f['engines']} {f['message'][:160]}" for f in report["findings"]
    )


# ---- the corpus ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if not c.cli])
def test_case_verdicts(case: Case, built) -> None:
    report = validate(str(built(case)))
    got = _statuses(report.verdicts, case.expect)
    assert got == case.expect, f"{case.id} ({case.thread}: {case.did})\n{_explain(report.to_dict())}"
    codes = {f.code for f in report.findings}
    assert set(case.codes) <= codes, f"{case.id}: expected codes {case.codes}, got {sorted(codes)}"
    if case.qconfig is not None and set(case.expect.values()) == {"loads"}:
        # a healthy quantized release must load as what it is, not as "an unquantized checkpoint"
        assert report.quantized, f"{case.id}: read as unquantized (right verdict, wrong reason)"


def _cli(path: Path, *flags: str) -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "quantgate.service.cli", "validate", str(path), "--format", "json", *flags],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.cli or c.id in CLI_CASES])
def test_case_verdicts_through_cli(case: Case, built) -> None:
    rc, report = _cli(built(case), *case.cli)
    assert _statuses(report["verdicts"], case.expect) == case.expect, f"{case.id}\n{_explain(report)}"
    assert rc == (0 if report["ok"] else 1)


# ---- the corpus itself ---------------------------------------------------------------------------
def test_corpus_covers_the_issue() -> None:
    """>= 25 cases, >= 5 published healthy releases, each format healthy and broken, unique ids."""
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    healthy = [c for c in CASES if c.published and set(c.expect.values()) == {"loads"}]
    assert len(healthy) >= 5
    for prefix in (
        "modelopt-nvfp4",
        "modelopt-fp8",
        "ct-nvfp4",
        "ct-w4a16",
        "ct-fp8",
        "ct-mxfp4",
        "fp8-",
        "mxfp4-",
        "gptq-",
        "gptq-dynamic",
        "awq-",
    ):
        group = [c for c in CASES if c.id.startswith(prefix)]
        assert any("loads" in c.expect.values() for c in group), f"no healthy {prefix} case"
        assert any(set(c.expect.values()) - {"loads"} for c in group), f"no broken {prefix} case"
    assert any("unknown" in c.expect.values() for c in CASES)
    for c in CASES:
        assert "#" in c.thread or c.thread.startswith("hf:"), c.id


def test_built_files_are_real_safetensors(built) -> None:
    """The hand-encoded shards open with the safetensors package and hold the encoded scale values."""
    from safetensors import safe_open

    case = next(c for c in CASES if c.id == "modelopt-nvfp4-gemma4-zero-expert-input-scale")
    path = built(case)
    with safe_open(str(path / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert "model.layers.0.experts.1.gate_proj.input_scale" in names
        assert float(f.get_tensor("model.layers.0.experts.1.gate_proj.input_scale")) == 0.0
        assert float(f.get_tensor("model.layers.0.experts.0.gate_proj.input_scale")) == pytest.approx(
            4 / 2688
        )
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert (path / "hf_quant_config.json").exists()


def test_packed_ct_lm_head_fails_in_sglang_only(tmp_path: Path) -> None:
    """QG218's other branch: a 4-bit packed CT lm_head does not fit SGLang's BF16 head; vLLM builds it."""
    import dataclasses

    import corpus_configs as qf
    from corpus_spec import routers

    base = next(c for c in CASES if c.id == "ct-nvfp4-qwen3moe-release")
    case = dataclasses.replace(
        base,
        id="ct-nvfp4-packed-lm-head",
        quant={**base.quant, "lm_head": "ct_nvfp4"},
        qconfig=lambda m: qf.compressed_tensors("nvfp4-pack-quantized", routers(m)),
    )
    report = validate(str(materialize(case, tmp_path / case.id)))
    assert _statuses(report.verdicts, ("vllm", "sglang")) == {"vllm": "loads", "sglang": "fails"}
    assert [f.engines for f in report.findings if f.code == "QG218"] == [("sglang",)]


def test_readme_lists_every_case() -> None:
    text = (Path(__file__).parent / "README.md").read_text()
    assert [c.id for c in CASES if f"`{c.id}`" not in text] == []


def test_gdn_conv1d_needs_no_exclusion(tmp_path: Path) -> None:
    """ModelOpt NVFP4 Qwen3.5-MoE with linear_attn quantized: the BF16 `conv1d` is never listed by producers
    and both engines build it without a quant config, so no QG201 for it."""
    import corpus_configs as qf
    from corpus_spec import routers

    nv = "modelopt_nvfp4"
    case = Case(
        "modelopt-nvfp4-qwen3_5moe-gdn",
        "",
        "x#0",
        "",
        "qwen3_5_moe",
        {"attn": nv, "linear_attn": nv, "expert": nv, "shared": nv},
        lambda m: qf.modelopt("NVFP4", ["lm_head", *routers(m)]),
        {"vllm": "loads", "sglang": "loads"},
        arch_kwargs={"hidden": 128, "hd": 32, "k_dim": 32},
    )
    report = validate(str(materialize(case, tmp_path / case.id)))
    assert _statuses(report.verdicts, case.expect) == case.expect, _explain(report.to_dict())
    assert not [f for f in report.findings if any("conv1d" in m for m in f.modules)]
