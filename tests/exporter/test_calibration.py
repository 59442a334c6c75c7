"""Calibration on real tiny transformers models (CPU): coverage, all-experts statistics, routing
untouched, amax against independent computations, stats files, and data sources."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantgate.exporter.calibration.data import CalibrationDataError, load_tokens, random_tokens, special_token_ids
from quantgate.exporter.calibration.experts import find_experts_modules, is_dispatched_experts
from quantgate.exporter.calibration.stats import STATS_FORMAT, STATS_VERSION, ActivationStats, ActivationStatsError
from quantgate.exporter.calibration.forward import CalibrationError, calibrate, calibrate_model, load_calibration_model
from quantgate.exporter.recipes import make_plan
from quantgate.exporter.source import open_source

transformers = pytest.importorskip("transformers")

MOE_ARCHS = ("gemma4", "gemma4_mm", "qwen3_moe", "qwen3_5_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4")
ALL_ARCHS = (*MOE_ARCHS, "llama")
SEQ = 16
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "calibration data for a tiny model",
    "experts route tokens by the router's top k scores",
    "numbers 0 1 2 3 4 5 6 7 8 9",
] * 20


@pytest.fixture(scope="session")
def model_dir(tiny_model):
    """arch -> directory of the shared tiny BF16 model (with tokenizer) of that architecture."""
    return tiny_model


@pytest.fixture(scope="session")
def calibrated(model_dir):
    """arch -> (source, plan, stats) of one full `calibrate` run (nvfp4 recipe, all experts)."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            source = open_source(str(model_dir(arch)))
            plan = make_plan(source.layout, "nvfp4")
            events = []
            stats = calibrate(
                source,
                plan,
                data="random",
                samples=4,
                seq_len=SEQ,
                batch_size=2,
                device="cpu",
                progress=events.append,
            )
            cache[arch] = (source, plan, stats, events)
        return cache[arch]

    return get


def _fp32_model(model_dir, arch: str) -> torch.nn.Module:
    return load_calibration_model(str(model_dir(arch)), device="cpu", dtype=torch.float32)


def _batches(n: int = 2, seq: int = SEQ, seed: int = 1) -> list[torch.Tensor]:
    return list(random_tokens(990, 2 * n, seq, exclude=range(3), seed=seed).split(2))


def _expert_targets(source) -> list:
    return [m for m in source.layout.modules.values() if m.kind.value == "expert"]


# ---------------------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_planned_module_gets_finite_positive_amax(calibrated, arch: str) -> None:
    source, plan, stats, events = calibrated(arch)
    quantized = plan.quantized()
    assert quantized and not stats.missing(quantized)
    assert all(math.isfinite(stats.amax[n]) and stats.amax[n] > 0 for n in quantized)
    assert not stats.uncalibrated, "all-experts calibration leaves no expert on a fallback value"
    experts = _expert_targets(source)
    assert all(m.name in stats.amax for m in experts)
    assert (len(experts) > 0) == (arch in MOE_ARCHS)
    meta = stats.metadata
    assert meta["tokens"] == 4 * SEQ and meta["tokens_per_s"] > 0 and meta["all_experts"] is True
    assert meta["samples"] == 4 and meta["seq_len"] == SEQ and meta["data"] == "random"
    assert events[-1].stage == "calibrate" and events[-1].fraction == 1.0
    assert events[-1].data["done_tokens"] == events[-1].data["total_tokens"] == 4 * SEQ
    # nothing outside the plan's static-scale modules is recorded (vision, routers, lm_head)
    assert set(stats.amax) == set(quantized)


def test_names_are_on_disk_names(calibrated) -> None:
    _, _, mixtral, _ = calibrated("mixtral")
    assert "model.layers.1.block_sparse_moe.experts.3.w1" in mixtral.amax
    assert (
        mixtral.amax["model.layers.1.block_sparse_moe.experts.3.w1"]
        == mixtral.amax["model.layers.1.block_sparse_moe.experts.3.w3"]
    )
    assert set(mixtral.expert_tokens) == {
        "model.layers.0.block_sparse_moe.experts",
        "model.layers.1.block_sparse_moe.experts",
    }
    mm_source, _, gemma_mm, _ = calibrated("gemma4_mm")
    assert "model.language_model.layers.0.experts.5.gate_proj" in gemma_mm.amax
    vision = [m.name for m in mm_source.layout.modules.values() if m.kind.value in ("vision", "projector")]
    assert vision and not set(vision) & set(gemma_mm.amax)
    assert all(n.startswith("model.language_model.") for n in gemma_mm.amax)
    _, _, dsv3, _ = calibrated("deepseek_v3")
    assert {
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
        "model.layers.1.mlp.experts.7.down_proj",
        "model.layers.1.self_attn.kv_b_proj",
    } <= set(dsv3.amax)


def test_expert_token_counts_are_real_routing(calibrated) -> None:
    _, _, stats, _ = calibrated("qwen3_moe")
    assert set(stats.expert_tokens) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    for group, counts in stats.expert_tokens.items():
        assert len(counts) == 8 and sum(counts) == 4 * SEQ * 2, group  # top-2 of every token
        unrouted = {f"{group}.{e}" for e, c in enumerate(counts) if c == 0}
        assert unrouted == {u for u in stats.unrouted_experts if u.rpartition(".")[0] == group}


# ---------------------------------------------------------------------------------------- experts maths
@torch.no_grad()
def _reference_down_amax(module: torch.nn.Module, x: torch.Tensor, expert: int) -> float:
    """act(gate)*up of one expert with F.linear / matmul, written independently of calibration.experts."""
    gated = getattr(module, "has_gate", True)
    weight = (module.gate_up_proj if gated else module.up_proj)[expert]
    bias = None
    if getattr(module, "has_bias", False):
        bias = (module.gate_up_proj_bias if gated else module.up_proj_bias)[expert]
    transposed = getattr(module, "is_transposed", type(module).__name__ == "Llama4TextExperts")
    out = x @ weight if transposed else F.linear(x, weight)
    if bias is not None:
        out = out + bias
    if hasattr(module, "_apply_gate"):
        h = module._apply_gate(out)
    else:
        gate, up = out.chunk(2, dim=-1)
        h = module.act_fn(gate) * up
    return float(h.abs().max())


@pytest.mark.parametrize("arch", [a for a in MOE_ARCHS if a != "llama4"])
def test_all_experts_statistics_match_independent_computation(model_dir, arch: str) -> None:
    model = _fp32_model(model_dir, arch)
    source = open_source(str(model_dir(arch)))
    plan = make_plan(source.layout, "nvfp4_experts_only")
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].clone()))
        for n, m in find_experts_modules(model).items()
    ]
    stats = calibrate_model(model, plan, _batches(), layout=source.layout, all_experts=True)
    for h in handles:
        h.remove()
    layer_inputs = {int(n.split("layers.")[1].split(".")[0]): (n, torch.cat(xs)) for n, xs in seen.items()}
    experts = _expert_targets(source)
    assert experts and not stats.uncalibrated
    for target in experts:
        runtime, x = layer_inputs[target.layer]
        if target.role in ("gate", "up"):
            assert stats.amax[target.name] == float(x.abs().max()), target.name  # the layer's input amax
        else:
            module = dict(model.named_modules())[runtime]
            ref = _reference_down_amax(module, x, target.expert)
            assert stats.amax[target.name] == pytest.approx(ref, rel=1e-5), target.name


def test_llama4_dense_experts_use_router_scaled_inputs(model_dir) -> None:
    """Llama4 feeds experts x * sigmoid(router logit); all-experts stats use each expert's own score."""
    model = _fp32_model(model_dir, "llama4")
    source = open_source(str(model_dir("llama4")))
    plan = make_plan(source.layout, "nvfp4_experts_only")
    routers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in find_experts_modules(model):
        layer = int(name.split("layers.")[1].split(".")[0])
        router = modules[name.rpartition(".")[0]].router
        handles.append(
            router.register_forward_hook(
                lambda m, a, o, layer=layer: routers.setdefault(layer, []).append(
                    (a[0].clone(), o[1].clone())
                )
            )
        )
    stats = calibrate_model(model, plan, _batches(), layout=source.layout, all_experts=True)
    for h in handles:
        h.remove()
    for target in _expert_targets(source):
        x = torch.cat([a for a, _ in routers[target.layer]])
        scores = torch.sigmoid(torch.cat([b for _, b in routers[target.layer]]))[
            :, target.expert : target.expert + 1
        ]
        xs = x * scores
        if target.role in ("gate", "up"):
            assert stats.amax[target.name] == pytest.approx(float(xs.abs().max()), rel=1e-6), target.name
        else:
            runtime = next(n for n in find_experts_modules(model) if f"layers.{target.layer}." in n)
            ref = _reference_down_amax(modules[runtime], xs, target.expert)
            assert stats.amax[target.name] == pytest.approx(ref, rel=1e-5), target.name


@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma4", "llama4"])
def test_routed_only_calibration_leaves_unrouted_experts_on_layer_max(model_dir, arch: str) -> None:
    model = _fp32_model(model_dir, arch)
    source = open_source(str(model_dir(arch)))
    plan = make_plan(source.layout, "nvfp4_experts_only")
    tiny = [random_tokens(990, 1, 3, exclude=range(3), seed=5)]  # 3 tokens x top-k <= 6 of 8 experts
    routed = calibrate_model(model, plan, tiny, layout=source.layout, all_experts=False)
    full = calibrate_model(model, plan, tiny, layout=source.layout, all_experts=True)
    assert routed.unrouted_experts and routed.unrouted_experts == full.unrouted_experts
    assert routed.expert_tokens == full.expert_tokens
    assert not full.uncalibrated and routed.uncalibrated
    assert any("saw no calibration token" in w for w in routed.warnings)
    for unrouted in routed.unrouted_experts:
        group, _, expert = unrouted.rpartition(".")
        mine = [n for n in routed.amax if n.startswith(f"{unrouted}.")]
        assert mine and set(mine) <= set(routed.uncalibrated)
        for name in mine:
            proj = name.rsplit(".", 1)[1]
            peers = [
                v
                for n, v in routed.amax.items()
                if n.startswith(f"{group}.") and n.endswith(f".{proj}") and n not in routed.uncalibrated
            ]
            assert routed.amax[name] == max(peers)
    # routed experts: all-experts statistics cover at least what the real routing showed
    for name, value in routed.amax.items():
        if name not in routed.uncalibrated:
            assert full.amax[name] >= value * (1 - 1e-6)


@pytest.mark.parametrize("arch", ["gemma4", "gpt_oss", "llama4", "mixtral"])
def test_model_outputs_use_real_routing(model_dir, arch: str) -> None:
    model = _fp32_model(model_dir, arch)
    source = open_source(str(model_dir(arch)))
    plan = make_plan(source.layout, "nvfp4")
    batches = _batches(1)
    with torch.inference_mode():
        reference = model(input_ids=batches[0], use_cache=False, logits_to_keep=1).logits
    captured = []
    handle = model.register_forward_hook(lambda m, a, out: captured.append(out.logits.clone()))
    calibrate_model(model, plan, batches, layout=source.layout, all_experts=True)
    handle.remove()
    assert torch.equal(captured[0], reference)
    impl = getattr(model.config, "_experts_implementation", None)
    assert impl != "quantgate_calib", "the previous experts implementation is restored"
    assert all(not hasattr(m, "_quantgate_experts_recorder") for m in model.modules())


def test_dispatched_detection_uses_module_flags(model_dir) -> None:
    gpt = _fp32_model(model_dir, "gpt_oss")
    (module,) = [m for n, m in find_experts_modules(gpt).items() if "layers.0" in n]
    assert is_dispatched_experts(module) and module.is_transposed and module.has_bias
    llama4 = _fp32_model(model_dir, "llama4")
    assert not any(is_dispatched_experts(m) for m in find_experts_modules(llama4).values())


# ---------------------------------------------------------------------------------------- Linears
def test_linear_amax_equals_plain_hook(model_dir) -> None:
    model = _fp32_model(model_dir, "llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].clone())) for n in names
    ]
    stats = calibrate_model(model, names, _batches(3))
    for h in handles:
        h.remove()
    for name in names:
        assert len(inputs[name]) == 3
        assert stats.amax[name] == max(float(x.abs().max()) for x in inputs[name])


def test_observing_lm_head_sees_every_position(model_dir) -> None:
    """Calibration asks for the last position's logits only, unless the output head is a target."""
    model = _fp32_model(model_dir, "llama")
    finals: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda m, a, out: finals.append(out.clone()))
    stats = calibrate_model(model, ["lm_head"], _batches(2))
    handle.remove()
    assert stats.amax["lm_head"] == max(float(h.abs().max()) for h in finals)


def test_unknown_module_is_a_clear_error(model_dir) -> None:
    model = _fp32_model(model_dir, "llama")
    with pytest.raises(CalibrationError, match="model.layers.9.mlp.up_proj"):
        calibrate_model(model, ["model.layers.9.mlp.up_proj"], _batches(1))


# ---------------------------------------------------------------------------------------- stats file
def test_stats_round_trip(calibrated, tmp_path: Path) -> None:
    _, plan, stats, _ = calibrated("gemma4")
    path = stats.save(tmp_path)
    assert path.name == "calibration.json"
    loaded = ActivationStats.load(path)
    assert loaded == stats
    loaded.check_covers(plan.quantized())
    raw = json.loads(path.read_text())
    assert raw["format"] == STATS_FORMAT and raw["version"] == STATS_VERSION


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=STATS_VERSION + 1), "newer quantgate"),
        (lambda d: d.update(format="something-else"), "not a quantgate activation-stats file"),
        (lambda d: d["amax"].update({"model.layers.0.mlp.up_proj": -1.0}), "finite number > 0"),
        (lambda d: d["amax"].update({"model.layers.0.mlp.up_proj": float("nan")}), "finite number > 0"),
        (lambda d: d.update(expert_tokens={"g": [1, -2]}), "non-negative"),
        (lambda d: d.update(amax={}), "non-empty"),
    ],
)
def test_stats_load_rejects_bad_files(tmp_path: Path, mutate, message: str) -> None:
    good = ActivationStats(amax={"model.layers.0.mlp.up_proj": 1.5}, metadata={"model": "m"}).to_dict()
    mutate(good)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(good))
    with pytest.raises(ActivationStatsError, match=message):
        ActivationStats.load(path)


def test_stats_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ActivationStatsError, match="does not exist"):
        ActivationStats.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ActivationStatsError, match=r"bad.json: not valid JSON \(line 1"):
        ActivationStats.load(bad)
    stats = ActivationStats(amax={"a": 1.0})
    with pytest.raises(ActivationStatsError, match="do not cover 1 module"):
        stats.check_covers(["a", "b"])


# ---------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir("llama"), local_files_only=True)


def test_jsonl_and_txt_sources_calibrate(model_dir, tmp_path: Path) -> None:
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(CORPUS)) + "\n")
    txt = tmp_path / "calib.txt"
    txt.write_text("\n".join(CORPUS))
    source = open_source(str(model_dir("llama")))
    plan = make_plan(source.layout, "fp8")
    for path, kind in ((jsonl, "jsonl"), (txt, "txt")):
        stats = calibrate(source, plan, data=str(path), samples=3, seq_len=SEQ, batch_size=2, device="cpu")
        assert stats.metadata["data"] == f"{kind}:{path}" and stats.metadata["tokens"] == 3 * SEQ
        assert not stats.missing(plan.quantized())


def test_text_tokens_are_packed_with_eos(tokenizer, tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:8]))
    ids, origin = load_tokens(str(jsonl), tokenizer=tokenizer, vocab_size=1000, samples=2, seq_len=8)
    assert ids.shape == (2, 8) and origin.startswith("jsonl:")
    expected = []
    for text in CORPUS[:8]:
        expected += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.flatten().tolist() == expected[:16]
    few, _ = load_tokens(str(jsonl), tokenizer=tokenizer, vocab_size=1000, samples=1000, seq_len=8)
    assert 1 <= few.shape[0] < 1000, "short data yields fewer samples, never repeated ones"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken\n', r"calib.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "x"}\n', r"calib.jsonl:2: expected an object with a string field 'text'"),
        ('["text"]\n', r"calib.jsonl:1: expected an object"),
        ("\n\n", "no text to calibrate on"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tokenizer, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        load_tokens(str(path), tokenizer=tokenizer, vocab_size=1000, samples=2, seq_len=8)


def test_data_source_errors(tokenizer, tmp_path: Path) -> None:
    csv = tmp_path / "calib.csv"
    csv.write_text("a,b\n")
    with pytest.raises(CalibrationDataError, match="unsupported calibration data file"):
        load_tokens(str(csv), tokenizer=tokenizer, vocab_size=1000, samples=1, seq_len=4)
    with pytest.raises(CalibrationDataError, match="not found"):
        load_tokens(
            str(tmp_path / "missing.jsonl"), tokenizer=tokenizer, vocab_size=1000, samples=1, seq_len=4
        )
    txt = tmp_path / "calib.txt"
    txt.write_text("hello")
    with pytest.raises(CalibrationDataError, match="no tokenizer"):
        load_tokens(str(txt), tokenizer=None, vocab_size=1000, samples=1, seq_len=4)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CalibrationDataError, match="pip install datasets"):
            load_tokens("some-org/some-dataset", tokenizer=tokenizer, vocab_size=1000, samples=1, seq_len=4)


def test_random_tokens_skip_special_and_multimodal_ids(model_dir) -> None:
    config = transformers.AutoConfig.from_pretrained(model_dir("gemma4_mm"), local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir("gemma4_mm"), local_files_only=True)
    special = special_token_ids(tok, config)
    placeholders = {config.image_token_id, config.boi_token_id, config.eoi_token_id}
    assert placeholders <= special and set(tok.all_special_ids) <= special
    ids = random_tokens(1000, 64, 32, exclude=special, seed=3)
    assert ids.shape == (64, 32) and ids.max() < 1000 and not set(ids.unique().tolist()) & special
    assert torch.equal(ids, random_tokens(1000, 64, 32, exclude=special, seed=3))
