"""Recipes select by layout kind; groups are all-or-nothing; shapes the scheme cannot hold are excluded."""

from __future__ import annotations

import pytest

from quantgate.exporter.recipes import RECIPES, make_plan
from quantgate.exporter.source import open_source
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Kind, build_layout
from quantgate.validators.safetensors_header import TensorInfo

ALWAYS_BF16 = {Kind.LM_HEAD, Kind.EMBEDDING, Kind.ROUTER, Kind.VISION, Kind.PROJECTOR, Kind.NORM, Kind.OTHER}
QUANTIZED_KINDS = {
    "nvfp4": {Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT},
    "nvfp4_mlp_only": {Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT},
    "nvfp4_experts_only": {Kind.EXPERT},
    "fp8": {Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT},
}


def test_recipe_names_match_modelopt() -> None:
    modelopt = {name: r for name, r in RECIPES.items() if "modelopt" in r.dialects}
    assert set(modelopt) == set(QUANTIZED_KINDS)
    assert {r.scheme_name for r in modelopt.values()} == {"NVFP4", "FP8"}


@pytest.mark.parametrize("arch", ["gemma4", "gemma4_mm", "qwen3_moe", "qwen3_5_moe", "mixtral", "deepseek_v3",
                                  "gpt_oss", "llama4", "llama"])
@pytest.mark.parametrize("recipe", sorted(QUANTIZED_KINDS))
def test_plan_follows_kinds(tiny_model, arch: str, recipe: str) -> None:
    layout = open_source(str(tiny_model(arch))).layout
    plan = make_plan(layout, recipe)
    assert set(plan.assignments) == set(layout.modules)
    for name, assignment in plan.assignments.items():
        module = layout.modules[name]
        if module.kind in ALWAYS_BF16:
            assert not assignment.quantized and assignment.reason, name
        elif assignment.quantized:
            assert module.kind in QUANTIZED_KINDS[recipe]
            assert module.in_features % assignment.scheme.in_divisor == 0
        else:
            assert assignment.reason, name
    routed = layout.by_kind(Kind.EXPERT)
    assert all(plan.assignments[m.name].quantized for m in routed), "experts must never be left BF16 silently"
    assert plan.needs_calibration == bool(plan.quantized())


def test_user_exclude_takes_the_whole_fused_group(tiny_model) -> None:
    layout = open_source(str(tiny_model("qwen3_moe"))).layout
    plan = make_plan(layout, "nvfp4", exclude=["model.layers.0.self_attn.q_proj"])
    a = plan.assignments
    assert "--exclude" in a["model.layers.0.self_attn.q_proj"].reason
    for sibling in ("k_proj", "v_proj"):
        assert not a[f"model.layers.0.self_attn.{sibling}"].quantized
        assert "all-or-nothing" in a[f"model.layers.0.self_attn.{sibling}"].reason
    assert a["model.layers.0.self_attn.o_proj"].quantized and a["model.layers.1.self_attn.q_proj"].quantized


def test_excluding_one_expert_excludes_the_moe_layer(tiny_model) -> None:
    """vLLM builds one FusedMoE per layer: one expert BF16 means the whole layer's experts BF16."""
    layout = open_source(str(tiny_model("gemma4"))).layout
    plan = make_plan(layout, "nvfp4", exclude=["model.layers.1.experts.2.down_proj"])
    layer1 = [m for m in layout.by_kind(Kind.EXPERT) if m.layer == 1]
    layer0 = [m for m in layout.by_kind(Kind.EXPERT) if m.layer == 0]
    assert layer1 and not any(plan.assignments[m.name].quantized for m in layer1)
    assert all(plan.assignments[m.name].quantized for m in layer0)
    assert any("model.layers.1.experts" in w for w in plan.warnings)


def _info(name: str, shape: tuple[int, ...]) -> TensorInfo:
    n = 2
    for d in shape:
        n *= d
    return TensorInfo(name=name, dtype="BF16", shape=shape, file="model.safetensors", start=0, end=n)


def test_nvfp4_indivisible_in_features_excluded_with_warning() -> None:
    """down_proj with in_features 40 (not a multiple of 16) stays BF16 under NVFP4, fine under FP8."""
    hidden, inter = 64, 40
    shapes = {
        "model.embed_tokens.weight": (128, hidden), "lm_head.weight": (128, hidden), "model.norm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.k_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.v_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
        "model.layers.0.mlp.gate_proj.weight": (inter, hidden), "model.layers.0.mlp.up_proj.weight": (inter, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, inter),
        "model.layers.0.input_layernorm.weight": (hidden,),
    }
    layout = build_layout({n: _info(n, s) for n, s in shapes.items()},
                          {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "num_hidden_layers": 1})
    plan = make_plan(layout, "nvfp4")
    down = plan.assignments["model.layers.0.mlp.down_proj"]
    assert not down.quantized and "not divisible by 16" in down.reason
    assert any("down_proj" in w for w in plan.warnings)
    assert plan.assignments["model.layers.0.mlp.gate_proj"].quantized
    assert make_plan(layout, "fp8").assignments["model.layers.0.mlp.down_proj"].quantized


def test_unknown_recipe_is_a_usage_error(tiny_model) -> None:
    layout = open_source(str(tiny_model("llama"))).layout
    with pytest.raises(UsageError, match="unknown recipe 'int3'.*nvfp4"):
        make_plan(layout, "int3")
