"""Layout of real tiny transformers checkpoints (saved by save_pretrained, read back from their headers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from layout_cases import EXPECTED, E, F, H, K, L, describe, layout_of, read_checkpoint
from safetensors.torch import load_file, save_file

from quantgate.validators.layout import FusedSlice, Kind, build_layout
from quantgate.validators.schemes import MODELOPT, match_scheme, scheme


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_layout_of_tiny_model(arch: str, tiny_model: Callable[..., Path]) -> None:
    expected = EXPECTED[arch]
    tensors, config = read_checkpoint(tiny_model(arch))
    layout = build_layout(tensors, config)
    assert layout.architecture == config["architectures"][0]
    assert layout.num_layers == L
    assert layout.num_experts == (None if arch == "llama" else E)
    assert Counter(m.kind for m in layout.modules.values()) == expected["kinds"]
    assert set(layout.unassigned) == expected["unassigned"]
    for name, want in expected["modules"].items():
        assert describe(layout.modules[name]) == want, name
    assert list(layout.modules) == sorted(layout.modules)
    # every tensor is accounted for exactly once: by a module or as unassigned
    owned = {t.name for m in layout.modules.values() for t in m.tensors.values()}
    assert owned | set(layout.unassigned) == set(tensors) and not owned & set(layout.unassigned)
    for kind in Kind:
        assert layout.by_kind(kind) == [m for m in layout.modules.values() if m.kind is kind]


@pytest.mark.parametrize("arch", [a for a, e in EXPECTED.items() if K.EXPERT in e["kinds"]])
def test_experts_and_groups_are_complete(arch: str, tiny_model: Callable[..., Path]) -> None:
    layout = layout_of(tiny_model(arch))
    experts = layout.by_kind(Kind.EXPERT)
    by_group = Counter(m.moe_group for m in experts)
    assert all(n == E * 3 for n in by_group.values()) and len(by_group) in (1, L)
    assert {m.expert for m in experts} == set(range(E))
    assert Counter(m.role for m in experts) == {
        "gate": len(experts) // 3,
        "up": len(experts) // 3,
        "down": len(experts) // 3,
    }
    pairs = Counter(m.fused_group for m in experts if m.fused_group)
    assert set(pairs.values()) == {2}  # gate + up of one expert


# fused 3-D storage per architecture: (experts container of layer 1, transposed, interleaved)
FUSED = {
    "gemma4": ("model.layers.1.experts", False, False),
    "gemma4_mm": ("model.language_model.layers.1.experts", False, False),
    "gpt_oss": ("model.layers.1.mlp.experts", True, True),
    "llama4": ("model.layers.1.feed_forward.experts", True, False),
}


@pytest.mark.parametrize("arch", list(FUSED))
def test_fused_experts_expand_to_virtual_modules(arch: str, tiny_model: Callable[..., Path]) -> None:
    experts, transposed, interleaved = FUSED[arch]
    layout = layout_of(tiny_model(arch))
    gate, up, down = (layout.modules[f"{experts}.3.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    gate_up_tensor, down_tensor = f"{experts}.gate_up_proj", f"{experts}.down_proj"
    assert gate.fused == FusedSlice(gate_up_tensor, 3, (0, F), transposed, interleaved)
    assert up.fused == FusedSlice(gate_up_tensor, 3, (F, 2 * F), transposed, interleaved)
    assert down.fused == FusedSlice(down_tensor, 3, None, transposed, interleaved)
    assert gate.tensors["weight"].shape == ((E, H, 2 * F) if transposed else (E, 2 * F, H))
    assert down.tensors["weight"].shape == ((E, F, H) if transposed else (E, H, F))
    assert (gate.out_features, gate.in_features, down.out_features, down.in_features) == (F, H, H, F)
    if arch == "gpt_oss":  # the biases ride along with the fused weights
        assert gate.tensors["bias"].name == f"{gate_up_tensor}_bias" and down.tensors["bias"].shape == (E, H)
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in layout.modules)


def slice_expert(fused: torch.Tensor, where: FusedSlice) -> torch.Tensor:
    """The per-expert [out, in] matrix a FusedSlice names (the contract the exporter's reader implements)."""
    w = fused[where.expert]
    w = w.T if where.transposed else w
    if where.rows is None:
        return w
    if where.interleaved:
        half = where.rows[0] // (where.rows[1] - where.rows[0])
        return w[half::2]
    return w[where.rows[0] : where.rows[1]]


def test_fused_slices_select_the_same_weights_as_the_unfused_format(tmp_path: Path) -> None:
    """Qwen3-MoE saved both ways: virtual modules of the fused runtime format == per-expert tensors."""
    from transformers import Qwen3MoeForCausalLM

    from quantgate.exporter.testkit.tiny_models import tiny_config

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM._from_config(tiny_config("qwen3_moe"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "original")
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    original, fused = layout_of(tmp_path / "original"), layout_of(tmp_path / "fused")
    assert list(original.modules) == list(fused.modules)
    assert [describe(m) for m in original.modules.values()] == [describe(m) for m in fused.modules.values()]
    orig_w, fused_w = (
        load_file(tmp_path / "original" / "model.safetensors"),
        load_file(tmp_path / "fused" / "model.safetensors"),
    )
    for m in fused.by_kind(Kind.EXPERT):
        assert m.fused is not None and not m.fused.transposed
        assert torch.equal(slice_expert(fused_w[m.fused.tensor], m.fused), orig_w[f"{m.name}.weight"]), m.name


def test_gpt_oss_interleaved_slices_match_the_runtime_split(tiny_model: Callable[..., Path]) -> None:
    """GPT-OSS computes `x @ gate_up_proj[e]` then gate = [..., ::2], up = [..., 1::2]."""
    path = tiny_model("gpt_oss")
    layout, weights = layout_of(path), load_file(path / "model.safetensors")
    x = torch.randn(3, H, dtype=torch.float32)
    gate, up = (
        layout.modules["model.layers.0.mlp.experts.2.gate_proj"],
        layout.modules["model.layers.0.mlp.experts.2.up_proj"],
    )
    runtime = x @ weights[gate.fused.tensor][2].float()
    assert torch.equal(x @ slice_expert(weights[gate.fused.tensor], gate.fused).float().T, runtime[..., ::2])
    assert torch.equal(x @ slice_expert(weights[up.fused.tensor], up.fused).float().T, runtime[..., 1::2])


def test_multimodal_wrapper_has_the_text_layout_under_its_prefix(tiny_model: Callable[..., Path]) -> None:
    text, wrapped = layout_of(tiny_model("gemma4")), layout_of(tiny_model("gemma4_mm"))
    language = {n: m for n, m in wrapped.modules.items() if m.kind not in (Kind.VISION, Kind.PROJECTOR)}
    assert all(n.startswith("model.language_model.") for n in language)
    assert {
        n.replace("model.language_model.", "model.", 1): describe(m)[:4] for n, m in language.items()
    } == {n: describe(m)[:4] for n, m in text.modules.items()}
    assert all(
        m.layer is None and m.name.startswith(("model.vision_tower.", "model.embed_vision."))
        for m in wrapped.modules.values()
        if m.kind in (Kind.VISION, Kind.PROJECTOR)
    )


NVFP4_KINDS = (Kind.ATTENTION, Kind.MLP, Kind.EXPERT, Kind.SHARED_EXPERT)


def write_modelopt_nvfp4_export(source: Path, out: Path) -> Path:
    """The tensor names, dtypes and shapes ModelOpt 0.47 writes for NVFP4 (lab_modelopt.md §3): per-expert
    `experts.{e}.gate_proj.*` for fused experts; routers, norms, embeddings stay BF16. Zero-valued data."""
    layout = layout_of(source)
    bf16 = load_file(source / "model.safetensors")
    spec = scheme(MODELOPT, "NVFP4")
    out.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    dtypes = {"U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32}
    for m in layout.modules.values():
        if m.kind in NVFP4_KINDS:
            for t in spec.tensors:
                tensors[f"{m.name}.{t.suffix}"] = torch.zeros(
                    t.shape(m.out_features, m.in_features), dtype=dtypes[t.dtypes[0]]
                )
        else:
            tensors.update({t.name: bf16[t.name] for t in m.tensors.values()})
    tensors.update({name: bf16[name] for name in layout.unassigned})
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text((source / "config.json").read_text())
    return out


@pytest.mark.parametrize("arch", ["gemma4", "gemma4_mm", "qwen3_moe", "mixtral"])
def test_quantized_export_lays_out_like_its_source(
    arch: str, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    source = tiny_model(arch)
    bf16, quantized = layout_of(source), layout_of(write_modelopt_nvfp4_export(source, tmp_path / "nvfp4"))
    assert list(quantized.modules) == list(bf16.modules)
    for name, m in quantized.modules.items():
        assert describe(m) == describe(bf16.modules[name]), name
        if m.kind in NVFP4_KINDS:
            assert m.fused is None and set(m.tensors) == {
                "weight",
                "weight_scale",
                "weight_scale_2",
                "input_scale",
            }
            assert m.tensors["weight"].shape == (m.out_features, m.in_features // 2)
            assert match_scheme(MODELOPT, m.tensors) is scheme(MODELOPT, "NVFP4")
        else:
            assert m.tensors["weight"].dtype in ("BF16", "F32")
    assert quantized.unassigned == bf16.unassigned
