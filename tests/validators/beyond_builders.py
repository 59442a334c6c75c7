"""Tiny real checkpoints in the engines' other formats (GPT-OSS mxfp4, GPTQ, AWQ), header-exact.

Each builder returns a `Spec` (tensor name -> dtype, shape, optional bytes; config.json) that a test
mutates, then `write()` lays out as one real safetensors file (a valid header, contiguous data) plus
config.json. Names, dtypes and relative shapes follow the published checkpoints
(openai/gpt-oss-20b, Qwen3-30B-A3B-GPTQ-Int4 / -AWQ; reference formats_beyond_two.md §3-5); dims are
tiny. Values are zeros unless a test sets bytes (scale-sanity cases). No torch.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.validators.safetensors_header import DTYPE_BITS

Tensor = tuple[str, tuple[int, ...], bytes | None]   # dtype, shape, data (None: zeros)


@dataclass
class Spec:
    tensors: dict[str, Tensor]
    config: dict
    extra_files: dict[str, dict] = field(default_factory=dict)

    @property
    def qc(self) -> dict:
        return self.config["quantization_config"]


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS[dtype] // 8


def write(spec: Spec, out: Path) -> Path:
    """One safetensors file with `spec.tensors` in order, and config.json."""
    out.mkdir(parents=True, exist_ok=True)
    header: dict[str, dict] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, (dtype, shape, data) in spec.tensors.items():
        size = nbytes(dtype, shape)
        body = data if data is not None else bytes(size)
        assert len(body) == size, (name, len(body), size)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        chunks.append(body)
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    raw += b" " * (-len(raw) % 8)
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))
    (out / "config.json").write_text(json.dumps(spec.config, indent=2))
    for name, doc in spec.extra_files.items():
        (out / name).write_text(json.dumps(doc))
    return out


def build(spec: Spec, out: Path, *mutations: Callable[[Spec], None]) -> Path:
    for mutate in mutations:
        mutate(spec)
    return write(spec, out)


# ---- GPT-OSS mxfp4 ---------------------------------------------------------------------------------
def gpt_oss_mxfp4(*, layers: int = 2, experts: int = 4, hidden: int = 64, intermediate: int = 64) -> Spec:
    """openai/gpt-oss-20b shaped: BF16 attention (+ biases, sinks), router, six fused MXFP4 tensors."""
    e, h, i = experts, hidden, intermediate
    heads, kv_heads, head_dim = 4, 2, 16
    t: dict[str, Tensor] = {"model.embed_tokens.weight": ("BF16", (128, h), None)}
    for n in range(layers):
        p = f"model.layers.{n}"
        t[f"{p}.input_layernorm.weight"] = ("BF16", (h,), None)
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,), None)
        for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                           ("v_proj", kv_heads * head_dim)):
            t[f"{p}.self_attn.{proj}.weight"] = ("BF16", (rows, h), None)
            t[f"{p}.self_attn.{proj}.bias"] = ("BF16", (rows,), None)
        t[f"{p}.self_attn.o_proj.weight"] = ("BF16", (h, heads * head_dim), None)
        t[f"{p}.self_attn.o_proj.bias"] = ("BF16", (h,), None)
        t[f"{p}.self_attn.sinks"] = ("BF16", (heads,), None)
        t[f"{p}.mlp.router.weight"] = ("BF16", (e, h), None)
        t[f"{p}.mlp.router.bias"] = ("BF16", (e,), None)
        x = f"{p}.mlp.experts"
        t[f"{x}.gate_up_proj_blocks"] = ("U8", (e, 2 * i, h // 32, 16), None)
        t[f"{x}.gate_up_proj_scales"] = ("U8", (e, 2 * i, h // 32), bytes([127]) * (e * 2 * i * h // 32))
        t[f"{x}.gate_up_proj_bias"] = ("BF16", (e, 2 * i), None)
        t[f"{x}.down_proj_blocks"] = ("U8", (e, h, i // 32, 16), None)
        t[f"{x}.down_proj_scales"] = ("U8", (e, h, i // 32), bytes([127]) * (e * h * i // 32))
        t[f"{x}.down_proj_bias"] = ("BF16", (e, h), None)
    t["model.norm.weight"] = ("BF16", (h,), None)
    t["lm_head.weight"] = ("BF16", (128, h), None)
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": h,
              "intermediate_size": i, "num_local_experts": e, "num_experts_per_tok": 2,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": head_dim, "vocab_size": 128,
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                  "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    return Spec(t, config)


def dequantize_mxfp4_experts(layer: int) -> Callable[[Spec], None]:
    """A fine-tune that saved BF16 experts ([E, H, 2I] / [E, I, H]) but kept the mxfp4 config."""
    def mutate(spec: Spec) -> None:
        x = f"model.layers.{layer}.mlp.experts"
        e, two_i = spec.tensors[f"{x}.gate_up_proj_blocks"][1][:2]
        h = spec.config["hidden_size"]
        for suffix in ("blocks", "scales", "bias"):
            for proj in ("gate_up_proj", "down_proj"):
                del spec.tensors[f"{x}.{proj}_{suffix}"]
        spec.tensors[f"{x}.gate_up_proj"] = ("BF16", (e, h, two_i), None)
        spec.tensors[f"{x}.gate_up_proj_bias"] = ("BF16", (e, two_i), None)
        spec.tensors[f"{x}.down_proj"] = ("BF16", (e, two_i // 2, h), None)
        spec.tensors[f"{x}.down_proj_bias"] = ("BF16", (e, h), None)
    return mutate


# ---- GPTQ / AWQ Qwen3-MoE ------------------------------------------------------------------------------
def _wna16(name: str, method: str, out: int, in_: int, bits: int, group: int, t: dict[str, Tensor],
           scale: bytes | None = None) -> None:
    pack = 32 // bits
    rows = 1 if group == -1 else in_ // group
    if method == "gptq":
        t[f"{name}.qweight"] = ("I32", (in_ // pack, out), None)
        t[f"{name}.qzeros"] = ("I32", (rows, out // pack), None)
        t[f"{name}.scales"] = ("F16", (rows, out), scale if scale is not None else _f16(1e-3, rows * out))
        t[f"{name}.g_idx"] = ("I32", (in_,), None)
    else:
        t[f"{name}.qweight"] = ("I32", (in_, out // 8), None)
        t[f"{name}.qzeros"] = ("I32", (rows, out // 8), None)
        t[f"{name}.scales"] = ("F16", (rows, out), scale if scale is not None else _f16(1e-3, rows * out))


def _f16(value: float, count: int) -> bytes:
    return struct.pack("<e", value) * count


def qwen3_moe_wna16(method: str, *, layers: int = 2, experts: int = 4, hidden: int = 128,
                    intermediate: int = 128, bits: int = 4, group: int = 32,
                    layer_bits: dict[int, int] | None = None, layer_group: dict[int, int] | None = None) -> Spec:
    """Qwen3-30B-A3B-GPTQ-Int4 / -AWQ shaped: every Linear in the layers quantized per expert,
    routers, norms, embeddings and lm_head BF16. `layer_bits` stores some layers at other bit widths
    and `layer_group` at other group sizes (GPTQModel `dynamic` per-layer overrides)."""
    h, i, e = hidden, intermediate, experts
    base_bits, base_group = bits, group
    heads, kv_heads, head_dim = 4, 2, 32
    t: dict[str, Tensor] = {"model.embed_tokens.weight": ("BF16", (256, h), None)}
    for n in range(layers):
        p = f"model.layers.{n}"
        bits = (layer_bits or {}).get(n, base_bits)
        group = (layer_group or {}).get(n, base_group)
        t[f"{p}.input_layernorm.weight"] = ("BF16", (h,), None)
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (h,), None)
        for proj, out in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                          ("v_proj", kv_heads * head_dim)):
            _wna16(f"{p}.self_attn.{proj}", method, out, h, bits, group, t)
        _wna16(f"{p}.self_attn.o_proj", method, h, heads * head_dim, bits, group, t)
        t[f"{p}.self_attn.q_norm.weight"] = ("BF16", (head_dim,), None)
        t[f"{p}.self_attn.k_norm.weight"] = ("BF16", (head_dim,), None)
        t[f"{p}.mlp.gate.weight"] = ("BF16", (e, h), None)
        for x in range(e):
            for proj, out, in_ in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
                _wna16(f"{p}.mlp.experts.{x}.{proj}", method, out, in_, bits, group, t)
    t["model.norm.weight"] = ("BF16", (h,), None)
    t["lm_head.weight"] = ("BF16", (256, h), None)
    bits, group = base_bits, base_group
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
              "lm_head": False, "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h,
              "moe_intermediate_size": i, "intermediate_size": 4 * i, "num_experts": e, "num_experts_per_tok": 2,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "head_dim": head_dim, "vocab_size": 256, "quantization_config": qc}
    return Spec(t, config)


def bf16_experts(layer: int) -> Callable[[Spec], None]:
    """Leave every expert of `layer` in BF16 (GPTQModel #1455: a layer the quantizer skipped)."""
    def mutate(spec: Spec) -> None:
        prefix = f"model.layers.{layer}.mlp.experts."
        names = sorted({n.rsplit(".", 1)[0] for n in spec.tensors if n.startswith(prefix)})
        for module in names:
            qweight = spec.tensors[f"{module}.qweight"][1]
            method = spec.qc["quant_method"]
            out, in_ = (qweight[1], qweight[0] * 8) if method == "gptq" else (qweight[1] * 8, qweight[0])
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                spec.tensors.pop(f"{module}.{suffix}", None)
            spec.tensors[f"{module}.weight"] = ("BF16", (out, in_), None)
    return mutate


def bf16_linear(module: str) -> Callable[[Spec], None]:
    """Store one quantized Linear in BF16 (its scales dropped)."""
    def mutate(spec: Spec) -> None:
        qweight = spec.tensors[f"{module}.qweight"][1]
        method = spec.qc["quant_method"]
        out, in_ = (qweight[1], qweight[0] * 8) if method == "gptq" else (qweight[1] * 8, qweight[0])
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            spec.tensors.pop(f"{module}.{suffix}", None)
        spec.tensors[f"{module}.weight"] = ("BF16", (out, in_), None)
    return mutate


def set_qc(**changes) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        spec.qc.update(changes)
    return mutate


def set_bytes(name: str, data: Callable[[int], bytes]) -> Callable[[Spec], None]:
    """Replace a tensor's data: `data(nbytes)` -> bytes."""
    def mutate(spec: Spec) -> None:
        dtype, shape, _ = spec.tensors[name]
        spec.tensors[name] = (dtype, shape, data(nbytes(dtype, shape)))
    return mutate


def drop(name: str) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        del spec.tensors[name]
    return mutate


# ---- compressed-tensors mxfp4-pack-quantized ---------------------------------------------------------
def qwen3_moe_ct_mxfp4(*, layers: int = 2, experts: int = 4, hidden: int = 128, intermediate: int = 128) -> Spec:
    """llm-compressor MXFP4 (W4A16 mxfp4 preset) on Qwen3-MoE: weight_packed U8 [out, in/2] and E8M0
    weight_scale U8 [out, in/32] per Linear; routers and lm_head in `ignore` by exact name."""
    spec = qwen3_moe_wna16("gptq", layers=layers, experts=experts, hidden=hidden, intermediate=intermediate)
    t: dict[str, Tensor] = {}
    for name, value in spec.tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix == "qweight":
            out, in_ = value[1][1], value[1][0] * 8
            t[f"{module}.weight_packed"] = ("U8", (out, in_ // 2), None)
            t[f"{module}.weight_scale"] = ("U8", (out, in_ // 32), bytes([127]) * (out * in_ // 32))
        elif suffix not in ("qzeros", "scales", "g_idx"):
            t[name] = value
    args = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32,
            "dynamic": False, "actorder": None, "observer": "minmax", "scale_dtype": "torch.uint8"}
    spec.config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args, "input_activations": None,
                                      "format": "mxfp4-pack-quantized"}},
        "ignore": ["lm_head"] + [f"model.layers.{n}.mlp.gate" for n in range(layers)], "kv_cache_scheme": None}
    spec.tensors = t
    return spec


def ct_bf16_experts(layer: int) -> Callable[[Spec], None]:
    """CT MXFP4 checkpoint whose `layer` experts stayed BF16 and are not ignored."""
    def mutate(spec: Spec) -> None:
        prefix = f"model.layers.{layer}.mlp.experts."
        for module in sorted({n.rsplit(".", 1)[0] for n in spec.tensors if n.startswith(prefix)}):
            out, half = spec.tensors[f"{module}.weight_packed"][1]
            del spec.tensors[f"{module}.weight_packed"], spec.tensors[f"{module}.weight_scale"]
            spec.tensors[f"{module}.weight"] = ("BF16", (out, half * 2), None)
    return mutate
