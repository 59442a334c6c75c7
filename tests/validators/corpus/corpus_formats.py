"""Tensor sets of each producer per format, and `materialize(case, out)` (configs: corpus_configs.py).

Tensor sets follow shared/reference: ModelOpt (modelopt.md §2), compressed-tensors
(llmcompressor_and_services.md §A2), HF `fp8` / `mxfp4` / GPTQ / AWQ / bitsandbytes
(formats_beyond_two.md §1-§6). Scale values are realistic magnitudes (ModelOpt NVFP4 weight_scale_2 =
amax/2688 for amax 0.5, input_scale for activation amax 4; compressed-tensors stores the reciprocals).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corpus_build import Experts, Model, Spec, expert_linears, write_safetensors

if TYPE_CHECKING:
    from corpus_spec import Case

W_AMAX, X_AMAX = 0.5, 4.0
NVFP4_W2, NVFP4_IN = W_AMAX / 2688, X_AMAX / 2688
FP8_W, FP8_IN = W_AMAX / 448, X_AMAX / 448
E8M0_ONE_EIGHTH = 124  # 2^(124-127): a typical MX block scale


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


Format = Callable[[int, int], dict[str, Spec]]

FORMATS: dict[str, Format] = {
    "bf16": lambda o, i: {"weight": ("BF16", (o, i), None)},
    "modelopt_nvfp4": lambda o, i: {
        "weight": ("U8", (o, i // 2), None),
        "weight_scale": ("F8_E4M3", (o, i // 16), 0.875),
        "weight_scale_2": ("F32", (), NVFP4_W2),
        "input_scale": ("F32", (), NVFP4_IN),
    },
    "modelopt_fp8": lambda o, i: {
        "weight": ("F8_E4M3", (o, i), None),
        "weight_scale": ("F32", (), FP8_W),
        "input_scale": ("F32", (), FP8_IN),
    },
    "ct_nvfp4": lambda o, i: {
        "weight_packed": ("U8", (o, i // 2), None),
        "weight_scale": ("F8_E4M3", (o, i // 16), 0.875),
        "weight_global_scale": ("F32", (1,), 1 / NVFP4_W2),
        "input_global_scale": ("F32", (1,), 1 / NVFP4_IN),
    },
    "ct_w4a16": lambda o, i: {
        "weight_packed": ("I32", (o, i // 8), None),
        "weight_scale": ("BF16", (o, i // 128), W_AMAX / 7),
        "weight_shape": ("I64", (2,), [o, i]),
    },
    "ct_fp8_dynamic": lambda o, i: {
        "weight": ("F8_E4M3", (o, i), None),
        "weight_scale": ("BF16", (o, 1), FP8_W),
    },
    "ct_fp8_channel_static": lambda o, i: {
        "weight": ("F8_E4M3", (o, i), None),
        "weight_scale": ("BF16", (o, 1), FP8_W),
    },
    "ct_mxfp4": lambda o, i: {
        "weight_packed": ("U8", (o, i // 2), None),
        "weight_scale": ("U8", (o, i // 32), E8M0_ONE_EIGHTH),
    },
    "fp8_block": lambda o, i: {
        "weight": ("F8_E4M3", (o, i), None),
        "weight_scale_inv": ("F32", (_cdiv(o, 128), _cdiv(i, 128)), FP8_W),
    },
    "gptq_int4": lambda o, i: {
        "qweight": ("I32", (i // 8, o), None),
        "qzeros": ("I32", (i // 128, o // 8), 0x77777777),
        "scales": ("F16", (i // 128, o), W_AMAX / 7),
        "g_idx": ("I32", (i,), [k // 128 for k in range(i)]),
    },
    "gptq_int8": lambda o, i: {
        "qweight": ("I32", (i // 4, o), None),
        "qzeros": ("I32", (i // 128, o // 4), 0x7F7F7F7F),
        "scales": ("F16", (i // 128, o), W_AMAX / 127),
        "g_idx": ("I32", (i,), [k // 128 for k in range(i)]),
    },
    "awq_int4": lambda o, i: {
        "qweight": ("I32", (i, o // 8), None),
        "qzeros": ("I32", (i // 128, o // 8), 0x88888888 - (1 << 32)),
        "scales": ("F16", (i // 128, o), W_AMAX / 7),
    },
    "bnb_nf4": lambda o, i: {
        "weight": ("U8", (o * i // 2, 1), None),
        "weight.absmax": ("U8", (o * i // 64,), 100),
        "weight.quant_map": ("F32", (16,), [k / 8 - 1 for k in range(16)]),
        "weight.nested_absmax": ("F32", (max(1, o * i // 16384),), 0.01),
        "weight.nested_quant_map": ("F32", (256,), 0.0),
        "weight.quant_state.bitsandbytes__nf4": ("U8", (96,), None),
    },
}


def fused_experts(e: Experts, fmt: str) -> dict[str, Spec]:
    """A fused MoE layer as its producer stores it: HF BF16 3-D tensors, or GPT-OSS MXFP4 blocks."""
    E, I, H = e.num, e.inter, e.hidden
    if fmt == "mxfp4_gpt_oss":
        return {
            f"{e.prefix}.gate_up_proj_blocks": ("U8", (E, 2 * I, H // 32, 16), None),
            f"{e.prefix}.gate_up_proj_scales": ("U8", (E, 2 * I, H // 32), E8M0_ONE_EIGHTH),
            f"{e.prefix}.gate_up_proj_bias": ("BF16", (E, 2 * I), None),
            f"{e.prefix}.down_proj_blocks": ("U8", (E, H, I // 32, 16), None),
            f"{e.prefix}.down_proj_scales": ("U8", (E, H, I // 32), E8M0_ONE_EIGHTH),
            f"{e.prefix}.down_proj_bias": ("BF16", (E, H), None),
        }
    assert fmt == "bf16", f"fused experts are BF16 or mxfp4_gpt_oss, not {fmt}"
    if e.fused == "gpt_oss":  # transposed [E, in, out], gate/up interleaved, with biases
        return {
            f"{e.prefix}.gate_up_proj": ("BF16", (E, H, 2 * I), None),
            f"{e.prefix}.gate_up_proj_bias": ("BF16", (E, 2 * I), None),
            f"{e.prefix}.down_proj": ("BF16", (E, I, H), None),
            f"{e.prefix}.down_proj_bias": ("BF16", (E, H), None),
        }
    return {
        f"{e.prefix}.gate_up_proj": ("BF16", (E, 2 * I, H), None),
        f"{e.prefix}.down_proj": ("BF16", (E, H, I), None),
    }


# ---- case -> files --------------------------------------------------------------------------------
def quantized_tensors(model: Model, quant: dict[str, str]) -> dict[str, Spec]:
    """Every tensor of `model` with each kind stored as `quant[kind]` (BF16 when absent)."""
    tensors = dict(model.extras)
    for lin in model.linears:
        for suffix, spec in FORMATS[quant.get(lin.kind, "bf16")](lin.out, lin.inp).items():
            tensors[f"{lin.name}.{suffix}"] = spec
    for e in model.experts:
        fmt = quant.get("expert", "bf16")
        if e.fused is not None and fmt in ("bf16", "mxfp4_gpt_oss"):
            tensors.update(fused_experts(e, fmt))
            continue
        for lin in expert_linears(e):
            for suffix, spec in FORMATS[fmt](lin.out, lin.inp).items():
                tensors[f"{lin.name}.{suffix}"] = spec
    return tensors


def materialize(case: Case, out: Path) -> Path:
    """Write `case` as a checkpoint directory under `out` (sharded with an index when case.shards > 1)."""
    model = case.model()
    tensors = quantized_tensors(model, case.quant)
    qc = case.qconfig(model) if case.qconfig else None
    config = json.loads(json.dumps(model.config))
    files: dict[str, dict] = {}
    if qc is not None:
        files.update(qc["files"])
        if qc["config"] is not None:
            config["quantization_config"] = qc["config"]
    for mutate in case.mutate:
        mutate(tensors, config, files)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2))
    names = sorted(tensors)
    if case.shards == 1:
        write_safetensors(out / "model.safetensors", tensors)
        return out
    per = _cdiv(len(names), case.shards)
    weight_map: dict[str, str] = {}
    for k in range(case.shards):
        part = names[k * per : (k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{case.shards:05d}.safetensors"
        write_safetensors(out / fname, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, fname))
    weight_map.update(case.index_extra)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    )
    return out
