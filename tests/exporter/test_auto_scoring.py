"""auto scoring on real tiny transformers models: fake-quant placement, both methods, the scores file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantgate.exporter.auto import ScoresFileError, candidate_specs, decision_groups, plan_auto
from quantgate.exporter.auto.fakequant import fake_quant_fused
from quantgate.exporter.auto.perturb import quantized
from quantgate.exporter.auto.runtime import bind_weights
from quantgate.exporter.auto.scoring import plan_kl, score_groups
from quantgate.exporter.calibration.data import random_tokens
from quantgate.exporter.calibration.model import load_calibration_model
from quantgate.exporter.source import open_source

SAMPLES = random_tokens(1000, 4, 24, exclude=range(16), seed=7)  # ids < 16 hold the specials
TINY_SCORING = {"score_samples": 3, "score_seq_len": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def loaded(tiny_model: Callable[..., Path]) -> Callable[[str], tuple[Any, Any]]:
    """`loaded(arch)` -> (Source, transformers model on CPU), once per module."""
    cache: dict[str, tuple[Any, Any]] = {}

    def get(arch: str) -> tuple[Any, Any]:
        if arch not in cache:
            path = tiny_model(arch)
            cache[arch] = (open_source(str(path)), load_calibration_model(str(path), device="cpu"))
        return cache[arch]

    return get


def _groups(source: Any, candidates: tuple[str, ...] = ("nvfp4", "fp8")) -> list:
    return decision_groups(source.layout, candidate_specs(candidates))


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# ------------------------------------------------------------------------- fake quant in place
@pytest.mark.parametrize("arch", ["gemma4", "qwen3_moe", "gpt_oss", "llama4"])
@pytest.mark.parametrize("algo", ["NVFP4", "FP8"])
def test_experts_fake_quant_lands_on_each_expert_slice(loaded: Callable, arch: str, algo: str) -> None:
    """Inside the 3-D runtime parameters every expert's gate, up and down hold exactly what the
    export computes from the checkpoint's [out, in] matrix (gate/up sharing one per-tensor scale);
    nothing else in the model moves, and everything is restored afterwards."""
    source, model = loaded(arch)
    group = next(g for g in _groups(source) if g.key.endswith("experts") and ".layers.1." in g.key)
    refs = bind_weights(model, source.layout, group.modules, source)
    before = _snapshot(model)
    with quantized([refs[m] for m in group.modules], algo):
        changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
        assert changed and all(
            n.endswith(("gate_up_proj", "down_proj")) and ".layers.1." in n for n in changed
        )
        by_fused: dict[str, list[str]] = {}
        for name in group.modules:
            by_fused.setdefault(source.layout.modules[name].fused_group or name, []).append(name)
        for members in by_fused.values():
            disk = [source.module_weight(source.layout.modules[m]) for m in members]
            kind = source.layout.modules[members[0]].kind
            for name, expected in zip(members, fake_quant_fused(disk, algo, kind)):
                assert torch.equal(refs[name].view(), expected), name
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_binding_refuses_runtime_weights_that_differ_from_the_checkpoint(loaded: Callable) -> None:
    """A runtime [gate; up] order other than the one assumed (here: halves swapped) is caught."""
    from quantgate.validators.errors import UnsupportedArchitectureError

    source, model = loaded("qwen3_moe")
    group = next(g for g in _groups(source) if g.key == "model.layers.0.mlp.experts")
    param = model.model.layers[0].mlp.experts.gate_up_proj
    original = param.data.clone()
    try:
        param.data.copy_(torch.cat(original.chunk(2, dim=1)[::-1], dim=1))
        with pytest.raises(UnsupportedArchitectureError, match="differs from the checkpoint"):
            bind_weights(model, source.layout, group.modules, source)
    finally:
        param.data.copy_(original)
    bind_weights(model, source.layout, group.modules, source)


# --------------------------------------------------------------------------------- the methods
@pytest.mark.parametrize("method", ["kl_div", "gradient"])
def test_scoring_restores_the_model(loaded: Callable, method: str) -> None:
    source, model = loaded("gemma4")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)
    scores = score_groups(model, source.layout, _groups(source), list(SAMPLES.split(2)), method=method)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    for by_scheme in scores.values():
        assert set(by_scheme) == {"NVFP4", "FP8"}
        assert by_scheme["NVFP4"] > by_scheme["FP8"] > 0  # 4-bit hurts more than 8-bit


def test_kl_div_score_is_the_measured_kl(loaded: Callable) -> None:
    source, model = loaded("llama")
    groups = _groups(source)
    batches = list(SAMPLES.split(2))
    scores = score_groups(model, source.layout, groups, batches, method="kl_div")
    refs = bind_weights(model, source.layout, [m for g in groups for m in g.modules])
    target = groups[3]
    choice = {g.key: "BF16" for g in groups} | {target.key: "NVFP4"}
    assert scores[target.key]["NVFP4"] == pytest.approx(
        plan_kl(model, refs, groups, choice, batches), rel=1e-6
    )


def test_gradient_scores_track_measured_kl(loaded: Callable) -> None:
    """The Fisher estimate ranks (group, scheme) pairs like the measured KL and is in the same unit."""
    from scipy.stats import spearmanr

    source, model = loaded("llama")
    groups = _groups(source)
    kl = score_groups(model, source.layout, groups, list(SAMPLES.split(2)), method="kl_div")
    grad = score_groups(model, source.layout, groups, list(SAMPLES.split(1)), method="gradient")
    pairs = [(kl[g.key][s], grad[g.key][s]) for g in groups for s in ("NVFP4", "FP8")]
    assert spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic > 0.8
    ratios = sorted(b / a for a, b in pairs)
    assert 0.2 < ratios[len(ratios) // 2] < 5.0  # median gradient/KL ratio near 1


@pytest.mark.parametrize("method", ["kl_div", "gradient"])
def test_multimodal_wrapper_scored_without_labels(
    loaded: Callable, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma4ForConditionalGeneration: the language model is scored through the wrapper's lm_head; no
    forward anywhere (wrapper or the inner base model) ever receives `labels`."""
    source, model = loaded("gemma4_mm")
    seen: list[str] = []
    for module in (model, model.model, model.model.language_model):
        original = module.forward

        def spy(
            *args: Any, _original: Any = original, _name: str = type(module).__name__, **kwargs: Any
        ) -> Any:
            assert kwargs.get("labels") is None, f"labels passed to {_name}"
            seen.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", spy)
    vision_before = _snapshot(model.model.vision_tower)
    scores = score_groups(model, source.layout, _groups(source), list(SAMPLES.split(2)), method=method)
    assert {"Gemma4ForConditionalGeneration", "Gemma4TextModel"} <= set(seen)
    assert all(k.startswith("model.language_model.layers.") for k in scores)
    assert all(v["NVFP4"] > 0 for v in scores.values())
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(after[n], t) for n, t in vision_before.items())


# ------------------------------------------------------------------------------- scores on disk
def test_replanning_from_scores_file_runs_no_forward(
    loaded: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, model = loaded("qwen3_moe")
    path = tmp_path / "scores.json"
    first = plan_auto(source, 6.0, method="kl_div", scores_file=path, model=model, **TINY_SCORING)
    saved = json.loads(path.read_text())
    assert saved["format"] == "quantgate.auto_scores" and saved["version"] == 1
    assert set(saved["fingerprint"]) == {"config_sha256", "tensors_sha256"}
    assert saved["groups"]["model.layers.0.mlp.experts"]["numel"] == 8 * 3 * 128 * 64

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("re-planning from a scores file must not run the model")

    monkeypatch.setattr(model, "forward", refuse)
    monkeypatch.setattr("quantgate.exporter.calibration.model.load_calibration_model", refuse)
    for bits in (5.0, 6.0, 12.0):
        plan = plan_auto(source, bits, method="kl_div", scores_file=path, model=model, **TINY_SCORING)
        assert plan.effective_bits <= bits
    again = plan_auto(source, 6.0, method="kl_div", scores_file=path, **TINY_SCORING)
    assert again.choice == first.choice and again.scores.scores == first.scores.scores


def test_scores_file_refuses_other_models_and_options(
    loaded: Callable, tiny_model: Callable, tmp_path: Path
) -> None:
    source, model = loaded("llama")
    path = tmp_path / "llama.json"
    plan_auto(source, 8.0, ("fp8",), method="gradient", scores_file=path, model=model, **TINY_SCORING)
    other = open_source(str(tiny_model("llama", seed=1, layers=3)))
    with pytest.raises(ScoresFileError, match="made for another model"):
        plan_auto(other, 8.0, ("fp8",), method="gradient", scores_file=path, **TINY_SCORING)
    with pytest.raises(ScoresFileError, match="--method gradient"):
        plan_auto(source, 8.0, ("fp8",), method="kl_div", scores_file=path, **TINY_SCORING)
    with pytest.raises(ScoresFileError, match="no scores for candidate"):
        plan_auto(source, 6.0, ("nvfp4", "fp8"), method="gradient", scores_file=path, **TINY_SCORING)
    raw = json.loads(path.read_text())
    for mutate, message in (
        (lambda r: r.update(version=99), "newer quantgate"),
        (lambda r: r.update(format="x"), "not a quantgate scores file"),
        (lambda r: next(iter(r["groups"].values()))["scores"].update(FP8=-1.0), "finite numbers >= 0"),
    ):
        broken = json.loads(json.dumps(raw))
        mutate(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ScoresFileError, match=message):
            plan_auto(source, 8.0, ("fp8",), method="gradient", scores_file=path, **TINY_SCORING)
    path.write_text("{not json")
    with pytest.raises(ScoresFileError, match="not valid JSON"):
        plan_auto(source, 8.0, ("fp8",), method="gradient", scores_file=path, **TINY_SCORING)
