"""ModelOpt's 3-D expert form (GPT-OSS / Llama4 kept fused): layout shapes and scheme matching from headers."""

from __future__ import annotations

import pytest
from layout_cases import E, F, H

from quantgate.validators.fused_schemes import match_fused_scheme, per_expert_scalars
from quantgate.validators.layout import build_layout
from quantgate.validators.safetensors_header import TensorInfo
from quantgate.validators.schemes import MODELOPT

X = "model.layers.0.feed_forward.experts"


def info(name: str, dtype: str, *shape: int) -> TensorInfo:
    return TensorInfo(name, dtype, tuple(shape), "model.safetensors", 0, 0)


def nvfp4_3d(out: int, in_: int, name: str = f"{X}.gate_up_proj", **shapes: tuple[int, ...]) -> dict[str, TensorInfo]:
    """A transposed NVFP4 3-D tensor set ([E, in/2, out] ...), with `shapes` overriding a suffix's shape."""
    default = {"weight": ("U8", (E, in_ // 2, out)), "weight_scale": ("F8_E4M3", (E, in_ // 16, out)),
               "weight_scale_2": ("F32", ()), "input_scale": ("F32", ())}
    return {s: info(name if s == "weight" else f"{name}_{s}", d, *shapes.get(s, shape))
            for s, (d, shape) in default.items()}


def test_packed_transposed_experts_have_their_logical_shape() -> None:
    """U8 [E, H/2, 2F] is packed along the input dim: each virtual expert is [F, H], not [F, H/2]."""
    tensors = {**{t.name: t for t in nvfp4_3d(2 * F, H).values()},
               **{t.name: t for t in nvfp4_3d(H, F, f"{X}.down_proj").values()}}
    layout = build_layout(tensors, {"model_type": "llama4_text", "hidden_size": H})
    gate, down = layout.modules[f"{X}.0.gate_proj"], layout.modules[f"{X}.0.down_proj"]
    assert (gate.out_features, gate.in_features) == (F, H)
    assert (down.out_features, down.in_features) == (H, F)


@pytest.mark.parametrize(("shapes", "matches"), [
    ({}, True),
    ({"weight_scale": (E, 2 * F, H // 16)}, False),      # block scales left [E, out, in/16]
    ({"weight": (E, 2 * F, H // 2)}, False),             # weight packed along out
    ({"weight_scale_2": (E,)}, True),                    # stacked per-expert scalars: matched, then warned
])
def test_match_fused_scheme_checks_the_orientation(shapes: dict, matches: bool) -> None:
    spec = match_fused_scheme(MODELOPT, nvfp4_3d(2 * F, H, **shapes), transposed=True)
    assert (spec is not None and spec.name == "NVFP4") is matches


def test_missing_scale_is_not_nvfp4_and_per_expert_scalars_are_named() -> None:
    tensors = nvfp4_3d(2 * F, H)
    del tensors["input_scale"]
    spec = match_fused_scheme(MODELOPT, tensors, transposed=True)
    assert spec is None or spec.name != "NVFP4"
    assert per_expert_scalars(nvfp4_3d(2 * F, H, weight_scale_2=(E,))) == ["weight_scale_2"]
    assert per_expert_scalars(nvfp4_3d(2 * F, H)) == []


def test_fused_storage_finds_the_stored_orientation() -> None:
    from quantgate.validators.fused_schemes import fused_storage

    modelopt = fused_storage(MODELOPT, nvfp4_3d(2 * F, H), transposed=True)
    flipped = fused_storage(MODELOPT, nvfp4_3d(2 * F, H, weight=(E, 2 * F, H // 2), weight_scale=(E, 2 * F, H // 16)),
                            transposed=True)
    assert modelopt is not None and (modelopt[0].name, modelopt[1]) == ("NVFP4", True)
    assert flipped is not None and (flipped[0].name, flipped[1]) == ("NVFP4", False)
    assert fused_storage(MODELOPT, nvfp4_3d(2 * F, H, weight_scale=(E, 2 * F, H // 16)), transposed=True) is None
