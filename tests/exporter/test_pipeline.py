"""End-to-end exports of real tiny transformers models: every recipe, validated, spelled as ModelOpt.

Exports are made once per session (`exported` fixture in conftest.py) and shared by these tests
and test_export_logits.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantgate.exporter.calibration.stats import ActivationStats
from quantgate.exporter.excludes import ExcludeSynthesis
from quantgate.exporter.pipeline import FAILED_SUFFIX, REPORT_JSON, QuantizeRequest, run_quantize
from quantgate.validators.checkpoint import open_checkpoint
from quantgate.validators.engines import ENGINE_SEMANTICS
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Kind, build_layout

ARCHS = ("gemma4", "gemma4_mm", "qwen3_moe", "qwen3_5_moe", "mixtral", "deepseek_v3", "llama")
RECIPES = ("nvfp4", "nvfp4_mlp_only", "nvfp4_experts_only", "fp8")
MOE_ARCHS = tuple(a for a in ARCHS if a != "llama")
CASES = [(a, r) for a in ARCHS for r in RECIPES if not (a == "llama" and r == "nvfp4_experts_only")]
QUANTIZED_WEIGHT_DTYPES = {"NVFP4": "U8", "FP8": "F8_E4M3"}
#: Kinds each recipe quantizes (the table the test holds the recipes to).
RECIPE_KINDS = {
    "nvfp4": {Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT},
    "nvfp4_mlp_only": {Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT},
    "nvfp4_experts_only": {Kind.EXPERT},
    "fp8": {Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT},
}


def read_all(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def export_layout(out: Path):
    view = open_checkpoint(str(out))
    return view, build_layout(view.tensors, view.config)


def algo(recipe: str) -> str:
    return "FP8" if recipe == "fp8" else "NVFP4"


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_export_validates_clean(exported, arch: str, recipe: str) -> None:
    _, result = exported(arch, recipe)
    errors = [f.to_dict() for f in result.report.findings if f.severity.value == "error"]
    assert result.ok, errors
    assert errors == []
    out = result.output
    assert out is not None and out.is_dir() and result.temp_output is None
    assert (out / REPORT_JSON).is_file() and (out / "calibration.json").is_file()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary directory left behind"
    for engine, verdict in result.report.verdicts.items():
        assert verdict["status"] == "loads", (engine, verdict)


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_quantized_modules_follow_recipe_and_experts_never_bf16(exported, arch: str, recipe: str) -> None:
    source, result = exported(arch, recipe)
    _, layout = export_layout(result.output)
    want = QUANTIZED_WEIGHT_DTYPES[algo(recipe)]
    kinds = RECIPE_KINDS[recipe]
    for name, module in layout.modules.items():
        weight = module.tensors.get("weight")
        if weight is None or len(weight.shape) != 2:   # norms, conv1d: not Linear layers
            continue
        quantized = weight.dtype == want and "weight_scale" in module.tensors
        assert quantized == (module.kind in kinds), (name, module.kind, weight.dtype)
    experts = layout.by_kind(Kind.EXPERT)
    if arch in MOE_ARCHS:
        assert experts, "the export lost its experts"
        assert all(m.tensors["weight"].dtype == want for m in experts)
        assert all(m.fused is None for m in experts), "fused 3-D experts must be written per expert"
        src_layout = build_layout(open_checkpoint(str(source)).tensors, None)
        assert {m.name for m in experts} == {m.name for m in src_layout.by_kind(Kind.EXPERT)}


EXPECTED_GROUP = {
    "NVFP4": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
    "FP8": {"dynamic": False, "num_bits": 8, "type": "float"},
}


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_configs_spelled_like_modelopt(exported, arch: str, recipe: str) -> None:
    """lab_modelopt.md §3, verbatim apart from the producer and the exclude list."""
    _, result = exported(arch, recipe)
    hf = json.loads((result.output / "hf_quant_config.json").read_text())
    a = algo(recipe)
    exclude = hf["quantization"]["exclude_modules"]
    quantization = {"quant_algo": a, "kv_cache_quant_algo": None, **({"group_size": 16} if a == "NVFP4" else {}),
                    "exclude_modules": exclude}
    assert list(hf) == ["producer", "quantization"]
    assert hf["producer"]["name"] == "quantgate" and isinstance(hf["producer"]["version"], str)
    assert list(hf["quantization"].items()) == list(quantization.items())
    config = json.loads((result.output / "config.json").read_text())
    qc = config["quantization_config"]
    assert list(qc) == ["config_groups", "ignore", "quant_algo", "producer", "quant_method"]
    assert qc == {"config_groups": {"group_0": {"input_activations": EXPECTED_GROUP[a], "weights": EXPECTED_GROUP[a],
                                                "targets": ["Linear"]}},
                  "ignore": exclude, "quant_algo": a, "producer": hf["producer"], "quant_method": "modelopt"}
    assert "lm_head" in exclude
    source_config = json.loads((exported(arch, recipe)[0] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_exclude_patterns_resolve_exactly_in_every_engine(exported, arch: str, recipe: str) -> None:
    _, result = exported(arch, recipe)
    view, layout = export_layout(result.output)
    exclude = view.hf_quant_config["quantization"]["exclude_modules"]
    quantized = [n for n, m in layout.modules.items() if "weight_scale" in m.tensors]
    bf16 = [n for n, m in layout.modules.items() if "weight_scale" not in m.tensors and m.kind is not Kind.NORM
            and len(m.tensors.get("weight", _NoShape).shape) >= 2]
    assert quantized and bf16
    for engine, sem in ENGINE_SEMANTICS.items():
        assert [q for q in quantized if sem.is_excluded(q, exclude, layout.architecture)] == [], engine
        assert [b for b in bf16 if not sem.is_excluded(b, exclude, layout.architecture)] == [], engine


class _NoShape:
    shape = ()


def _scalar(tensors: dict[str, torch.Tensor], name: str) -> float:
    t = tensors[name]
    assert t.dtype == torch.float32 and t.shape == ()
    return float(t)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("recipe", ("nvfp4", "fp8"))
def test_scale_sharing(exported, arch: str, recipe: str) -> None:
    """NVFP4: fused groups share weight_scale_2 and input_scale; FP8: fused groups share input_scale,
    an expert's gate/up share weight_scale, q/k/v keep their own; experts of a layer share input scales."""
    _, result = exported(arch, recipe)
    tensors = read_all(result.output)
    _, layout = export_layout(result.output)
    groups: dict[str, list] = {}
    moe: dict[tuple[str, bool], set[float]] = {}
    for m in layout.modules.values():
        if "weight_scale" not in m.tensors:
            continue
        if m.fused_group:
            groups.setdefault(m.fused_group, []).append(m)
        if m.kind is Kind.EXPERT:
            moe.setdefault((m.moe_group, m.role == "down"), set()).add(_scalar(tensors, f"{m.name}.input_scale"))
    assert groups
    for key, members in groups.items():
        inputs = {_scalar(tensors, f"{m.name}.input_scale") for m in members}
        assert len(inputs) == 1, key
        if recipe == "nvfp4":
            assert len({_scalar(tensors, f"{m.name}.weight_scale_2") for m in members}) == 1, key
        elif members[0].kind is Kind.EXPERT:
            assert len({_scalar(tensors, f"{m.name}.weight_scale") for m in members}) == 1, key
    assert moe and all(len(values) == 1 for values in moe.values()), moe
    if recipe == "fp8":   # q/k/v keep separate weight scales under FP8 (ModelOpt does not unify them)
        qkv = [g for k, g in groups.items() if k.endswith("qkv")]
        assert not qkv or any(len({_scalar(tensors, f"{m.name}.weight_scale") for m in g}) > 1 for g in qkv)


def test_input_scale_is_max_amax_over_group(exported) -> None:
    """input_scale = max(amax over the group) / 2688 for NVFP4, from the saved calibration stats."""
    _, result = exported("qwen3_moe", "nvfp4")
    stats = ActivationStats.load(result.output / "calibration.json")
    tensors = read_all(result.output)
    _, layout = export_layout(result.output)
    layer_experts = [m for m in layout.by_kind(Kind.EXPERT) if m.layer == 0 and m.role == "down"]
    expected = max(stats.input_amax(m.name) for m in layer_experts) / (6 * 448)
    got = _scalar(tensors, f"{layer_experts[0].name}.input_scale")
    assert got == pytest.approx(expected, rel=1e-6)
    qkv = [m for m in layout.modules.values() if m.fused_group == "model.layers.1.self_attn.qkv"]
    expected = max(stats.input_amax(m.name) for m in qkv) / (6 * 448)
    assert _scalar(tensors, f"{qkv[0].name}.input_scale") == pytest.approx(expected, rel=1e-6)


def test_tied_embeddings_write_no_lm_head(exported) -> None:
    source, result = exported("gemma4", "nvfp4")
    assert json.loads((source / "config.json").read_text()).get("tie_word_embeddings", True)
    names = set(read_all(result.output))
    assert not any(n.startswith("lm_head") for n in names)
    assert "model.embed_tokens.weight" in names


def test_multimodal_language_model_quantized_vision_left_bf16(exported) -> None:
    _, result = exported("gemma4_mm", "nvfp4")
    view, layout = export_layout(result.output)
    exclude = view.hf_quant_config["quantization"]["exclude_modules"]
    quantized = [n for n, m in layout.modules.items() if "weight_scale" in m.tensors]
    assert quantized and all(n.startswith("model.language_model.") for n in quantized)
    for m in layout.by_kind(Kind.VISION) + layout.by_kind(Kind.PROJECTOR):
        assert "weight_scale" not in m.tensors and m.tensors["weight"].dtype in ("BF16", "F32"), m.name
        if len(m.tensors["weight"].shape) >= 2:
            assert ENGINE_SEMANTICS["vllm"].is_excluded(m.name, exclude, layout.architecture), m.name


def test_non_weight_files_copied(exported) -> None:
    source, result = exported("qwen3_moe", "fp8")
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "config.json", "model.safetensors.index.json"):
            assert (result.output / f.name).read_bytes() == f.read_bytes(), f.name


def test_tiny_shards_index_and_streaming(exported, tmp_path: Path) -> None:
    """A 48 kB shard limit gives several shards and a correct index; the writer never buffers more
    than one shard (plus the unit that overflows it)."""
    source, first = exported("qwen3_moe", "nvfp4")
    shard_size = 48_000
    seen: list[int] = []
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=tmp_path / "sharded", device="cpu",
                          calib_stats=first.output / "calibration.json", shard_size=shard_size)
    result = run_quantize(req, _writer_hook=seen.append)
    assert result.ok
    out = result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3 and set(index["weight_map"].values()) == set(files)
    total = 0
    for f in files:
        tensors = load_file(str(out / f))
        assert {n for n, s in index["weight_map"].items() if s == f} == set(tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert read_all(out).keys() == read_all(first.output).keys()
    # a unit never grows past its source tensors, so one shard plus the largest source tensor bounds it
    largest_unit = max(info.nbytes for info in open_checkpoint(str(source)).tensors.values())
    assert seen and max(seen) == result.max_buffered_bytes <= shard_size + largest_unit


def test_failed_validation_keeps_output_aside(exported, tmp_path: Path, monkeypatch) -> None:
    """Drop the exclude list: routers stay BF16 unexcluded, the validator fails the export, and
    nothing appears at the final path."""
    from quantgate.exporter.writers import modelopt

    source, first = exported("qwen3_moe", "nvfp4")
    monkeypatch.setattr(modelopt, "build_excludes", lambda src, plan: ExcludeSynthesis(patterns=[]))
    out = tmp_path / "broken"
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=out, device="cpu",
                          calib_stats=first.output / "calibration.json")
    result = run_quantize(req)
    assert not result.ok and result.output is None
    assert not out.exists()
    assert result.temp_output == tmp_path / ("broken" + FAILED_SUFFIX)
    report = json.loads((result.temp_output / REPORT_JSON).read_text())
    assert any(f["severity"] == "error" for f in report["findings"])
    assert not list(tmp_path.glob(".broken.tmp-*"))


def test_existing_output_refused_unless_overwrite(exported, tmp_path: Path) -> None:
    source, first = exported("mixtral", "fp8")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    req = QuantizeRequest(source=str(source), recipe="fp8", out=out, device="cpu",
                          calib_stats=first.output / "calibration.json")
    with pytest.raises(UsageError, match="--overwrite"):
        run_quantize(req)
    assert (out / "keep.txt").read_text() == "mine"
    req.overwrite = True
    events = []
    result = run_quantize(req, events.append)
    assert result.ok and not (out / "keep.txt").exists() and (out / "hf_quant_config.json").is_file()
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["plan", "calibrate", "quantize", "write", "validate", "finalize"]
    assert all(e.fraction is None or 0.0 <= e.fraction <= 1.0 for e in events)
    assert events[-1].data["ok"] is True


def test_dense_model_with_experts_only_recipe_is_a_clear_error(tiny_model, tmp_path: Path) -> None:
    req = QuantizeRequest(source=str(tiny_model("llama")), recipe="nvfp4_experts_only", out=tmp_path / "x")
    with pytest.raises(UsageError, match="quantizes no module"):
        run_quantize(req)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
