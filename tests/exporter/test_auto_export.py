"""`--recipe auto` end to end: budgets, MIXED_PRECISION export, validation, dequantized logits, scores reuse.

Each tiny model is scored once (gradient method, a few sequences) by its first export at 6.0 bits,
whose `--scores` file every other budget of the model then reuses. The models are those of the
budget tests in test_auto_optimize.py: 4 layers for Qwen3-MoE and Llama, where 2 layers make 6.0
bits unreachable within 0.25 bits (the experts alone are 94 % of Qwen3-MoE's weights).

The logits bound is derived as in test_export_logits.py (see its docstring), with one change for a
mixed plan: each quantized weight receives the Gaussian noise of its own scheme (NVFP4 or FP8).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from logit_bounds import assert_logits_within_noise_bound, weight_tensor
from test_export_logits import scheme_eps  # noqa: F401 - fixture

from quantgate.exporter.auto.groups import is_quantizable
from quantgate.exporter.auto.options import EXPORTABLE_ALGOS
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.schemes import writable_algos
from quantgate.exporter.source import Source, open_source
from quantgate.exporter.writers.modelopt_mixed import mixed_writable_algos
from quantgate.service.cli import main as cli_main
from quantgate.validators.errors import UsageError
from quantgate.validators.schemes import bits_per_weight, match_scheme

MODELS: dict[str, dict[str, Any]] = {
    "gemma4": {},
    "gemma4_mm": {},
    "qwen3_moe": {"layers": 4},
    "llama": {"layers": 4},
}
BOTH = ("nvfp4", "fp8")
FAST = {"calib_samples": 4, "calib_seq_len": 32, "calib_batch_size": 2, "score_samples": 4,
        "method": "gradient", "device": "cpu"}
FULL_BUDGET = 6.0


@pytest.fixture(scope="module")
def auto_export(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """`auto_export(arch, bits, candidates)` -> (source dir, scores file, QuantizeResult), made once."""
    root = tmp_path_factory.mktemp("auto_exports")
    cache: dict[tuple, tuple[Path, Path, Any]] = {}

    def get(arch: str, bits: float = FULL_BUDGET, candidates: tuple[str, ...] = BOTH) -> tuple[Path, Path, Any]:
        key = (arch, bits, candidates)
        if key not in cache:
            scores = root / f"{arch}-scores.json"
            if not scores.exists() and key != (arch, FULL_BUDGET, BOTH):
                get(arch)       # score with every candidate first, so any budget can reuse the file
            source = tiny_model(arch, **MODELS[arch])
            req = QuantizeRequest(source=str(source), recipe="auto", bits=bits, candidates=candidates,
                                  scores=scores, out=root / f"{arch}-{bits:g}-{'-'.join(candidates)}", **FAST)
            cache[key] = (source, scores, run_quantize(req))
        return cache[key]

    return get


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _stored_algos(export_dir: Path, source: Source) -> dict[str, str | None]:
    """Every quantizable source module -> the quant_algo its export bytes hold (None = BF16)."""
    export = open_source(str(export_dir))
    out: dict[str, str | None] = {}
    for name, module in source.layout.modules.items():
        if is_quantizable(module):
            spec = match_scheme("modelopt", export.layout.modules[name].tensors)
            out[name] = spec.quant_algo if spec is not None else None
    return out


def _bits_from_bytes(algos: dict[str, str | None], source: Source) -> float:
    """Effective bits recounted from the export's tensors: Σ numel × bits / Σ numel."""
    from quantgate.validators.schemes import scheme_for_quant_algo

    numel = {n: source.layout.modules[n].out_features * source.layout.modules[n].in_features for n in algos}
    total = sum(numel[n] * bits_per_weight(scheme_for_quant_algo(a) if a else None) for n, a in algos.items())
    return total / sum(numel.values())


def _groups(source: Source) -> list[list[str]]:
    """Modules that must share one algo: fused groups and the experts of one MoE layer."""
    groups: dict[str, list[str]] = {}
    for module in source.layout.modules.values():
        for key in (module.fused_group, module.moe_group):
            if key and is_quantizable(module):
                groups.setdefault(key, []).append(module.name)
    return list(groups.values())


# ----------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("arch", list(MODELS))
def test_budget_6_mixes_formats_and_validates(auto_export: Callable, arch: str) -> None:
    source_dir, _, result = auto_export(arch)
    assert result.ok, [f"{f.code} {f.message}" for f in result.report.findings]
    assert not [f for f in result.report.findings if f.severity.value != "info"]
    out, source = result.output, open_source(str(source_dir))
    summary = result.auto
    assert 5.75 <= summary["effective_bits"] <= FULL_BUDGET and summary["bits_budget"] == FULL_BUDGET
    assert {"NVFP4", "FP8"} <= set(summary["by_scheme"]), summary["by_scheme"]

    algos = _stored_algos(out, source)
    assert _bits_from_bytes(algos, source) == pytest.approx(summary["effective_bits"], abs=1e-5)
    assert _json(out / "quantgate-report.json")["auto"] == summary
    plan_file = _json(out / "auto_plan.json")
    assert plan_file["effective_bits"] == summary["effective_bits"]
    assert {n: (s and s.upper()) for n, s in plan_file["modules"].items()} == algos

    hf = _json(out / "hf_quant_config.json")["quantization"]
    flat = _json(out / "config.json")["quantization_config"]
    assert hf["quant_algo"] == flat["quant_algo"] == "MIXED_PRECISION" and flat["quant_method"] == "modelopt"
    layers = hf["quantized_layers"]
    assert flat["quantized_layers"] == layers
    # every quantized module is listed with the algo its bytes hold; unlisted modules are BF16
    assert layers == {n: ({"quant_algo": a, "group_size": 16} if a == "NVFP4" else {"quant_algo": a})
                      for n, a in algos.items() if a is not None}
    assert hf["exclude_modules"] == flat["ignore"]
    # config_groups: one per distinct layer config, targets partition the listed modules
    targets = [t for group in flat["config_groups"].values() for t in group["targets"]]
    assert sorted(targets) == sorted(layers) and len(flat["config_groups"]) == 2
    for group in _groups(source):
        assert len({algos[m] for m in group}) == 1, group


@pytest.mark.parametrize("arch", list(MODELS))
def test_budget_4_5_nvfp4_only_is_uniform_nvfp4(auto_export: Callable, arch: str) -> None:
    source_dir, _, result = auto_export(arch, 4.5, ("nvfp4",))
    assert result.ok and result.auto["effective_bits"] == 4.5
    source = open_source(str(source_dir))
    algos = _stored_algos(result.output, source)
    assert set(algos.values()) == {"NVFP4"}
    hf = _json(result.output / "hf_quant_config.json")["quantization"]
    assert hf["quant_algo"] == "NVFP4" and "quantized_layers" not in hf     # ModelOpt's uniform form


@pytest.mark.parametrize("arch", list(MODELS))
def test_budget_16_keeps_everything_bf16(auto_export: Callable, arch: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    source_dir, scores, _ = auto_export(arch)
    _refuse_forward(monkeypatch)
    req = QuantizeRequest(source=str(source_dir), recipe="auto", bits=16.0, scores=scores, out=tmp_path / "o",
                          **FAST)
    with pytest.raises(UsageError, match="keeps every decoder Linear BF16"):
        run_quantize(req)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("arch", list(MODELS))
def test_mixed_export_logits_within_scheme_bound(auto_export: Callable, arch: str,
                                                 scheme_eps: dict[str, float]) -> None:  # noqa: F811 - fixture
    source_dir, _, result = auto_export(arch)
    source = open_source(str(source_dir))
    algos = _stored_algos(result.output, source)
    # each quantized weight gets Gaussian noise at its own scheme's level
    noisy = {weight_tensor(source, name): scheme_eps[algo] for name, algo in algos.items() if algo is not None}
    assert_logits_within_noise_bound(source, source_dir, result.output, noisy)


# ---------------------------------------------------------------------------- scores reuse, CLI
def _refuse_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model for scoring or calibration, and scoring itself, fail the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("re-planning from a scores file must not run the model")

    monkeypatch.setattr("quantgate.exporter.calibration.model.load_calibration_model", refuse)
    monkeypatch.setattr("quantgate.exporter.calibration.forward.load_calibration_model", refuse)
    monkeypatch.setattr("quantgate.exporter.auto.scoring.score_groups", refuse)
    monkeypatch.setattr("quantgate.exporter.auto.planner.score_groups", refuse)


def test_cli_replans_from_scores_without_forward_passes(auto_export: Callable, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    source_dir, scores, first = auto_export("llama")
    _, _, uniform = auto_export("llama", 4.5, ("nvfp4",))     # its calibration covers every decoder Linear
    _refuse_forward(monkeypatch)
    out = tmp_path / "llama-5"
    rc = cli_main(["quantize", str(source_dir), "--recipe", "auto", "--bits", "5.0", "--scores", str(scores),
                   "--calib-stats", str(uniform.output / "calibration.json"), "--out", str(out),
                   "--device", "cpu", "--progress", "none"])
    stderr = capsys.readouterr().err
    assert rc == 0, stderr
    plan = _json(out / "auto_plan.json")
    assert plan["bits_budget"] == 5.0 and 4.75 <= plan["effective_bits"] <= 5.0
    assert plan["effective_bits"] < first.auto["effective_bits"]
    assert f"auto: {plan['effective_bits']:.3f} effective bits (budget 5" in stderr
    assert _json(out / "auto_scores.json")["groups"] == _json(scores)["groups"]   # the export keeps its scores
    assert _json(out / "hf_quant_config.json")["quantization"]["quant_algo"] == "MIXED_PRECISION"


@pytest.mark.parametrize(("args", "reason"), [
    (["--recipe", "auto"], "recipe auto needs --bits"),
    (["--recipe", "auto", "--bits", "3"], "budget of 3 bits per weight is infeasible"),
    (["--recipe", "auto", "--bits", "17"], "must be in (0, 16]"),
    (["--recipe", "auto", "--bits", "6", "--candidates", "nvfp4,int4"], "candidate 'int4' cannot be exported"),
    (["--recipe", "auto", "--bits", "6", "--candidates", "bf16"], "at least one quantized format"),
    (["--recipe", "fp8", "--bits", "6"], "--bits only applies to recipe auto"),
    (["--recipe", "nvfp4", "--method", "kl_div"], "--method only applies to recipe auto"),
])
def test_cli_auto_usage_errors_exit_2(tiny_model: Callable[..., Path], tmp_path: Path, args: list[str],
                                      reason: str, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_forward(monkeypatch)        # bad input is refused before any model is loaded
    rc = cli_main(["quantize", str(tiny_model("llama")), "--out", str(tmp_path / "o"), "--device", "cpu",
                   "--score-samples" if "auto" in args else "--calib-samples", "2", "--calib-seq-len", "16", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("quantgate quantize: error:")]
    assert rc == 2 and len(lines) == 1 and reason in lines[0], err
    assert not (tmp_path / "o").exists()


def test_exportable_candidates_match_the_writer() -> None:
    assert set(EXPORTABLE_ALGOS) == set(mixed_writable_algos()) and set(EXPORTABLE_ALGOS) <= writable_algos()
