"""Write a DeepSeek-V3-shaped NVFP4 (ModelOpt dialect) or native fp8 checkpoint whose tensor data are file holes.

The checkpoint has the real DeepSeek-V3 module set and shapes (61 layers, the first 3 dense, 256
routed experts + 1 shared expert per MoE layer, MLA attention), about 180k tensors in 72 shards.
Only the safetensors headers and the scalar scales (`weight_scale_2`, `input_scale`) are real
bytes; everything else is a hole (`truncate`), so ~390 GB of logical data take a few MB on disk.
Header-only validation and the deep scale checks can run on it; nothing else can.

`--form fp8` writes the same model as deepseek-ai/DeepSeek-V3 ships it: native fp8 block
quantization (config.json `quant_method: fp8`, `weight_block_size: [128, 128]`, dynamic activations,
no exclusion list): each linear is `weight` F8_E4M3 [out, in] + `weight_scale_inv` F32
[ceil(out/128), ceil(in/128)], whose values are real bytes (~160 MB: the deep checks read them all).

Shards are laid out as `safetensors` itself writes them (what `save_pretrained` and ModelOpt's
export produce): tensors are split into shards in module order, then inside each shard the data
are sorted by dtype (F32 first, then BF16, F8_E4M3, U8, the order of safetensors' `Dtype` enum,
descending) and name, and the header lists them in data order. So the scalar scales of a shard
are contiguous at the start of its data section. `--order module` writes the data in module
order instead (every scalar pair between two multi-MB weights: the worst case for scale reads).

    python -m benchmarks.make_dsv3_checkpoint OUT_DIR [--shards 72] [--order safetensors|module] [--form nvfp4|fp8]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# DeepSeek-V3 dimensions (config.json of deepseek-ai/DeepSeek-V3).
HIDDEN = 7168
INTERMEDIATE = 18432                 # dense MLP of the first layers
MOE_INTERMEDIATE = 2048              # per routed / shared expert
VOCAB = 129280
NUM_LAYERS = 61
FIRST_DENSE = 3                      # first_k_dense_replace
ROUTED_EXPERTS = 256
SHARED_EXPERTS = 1
NUM_HEADS = 128
Q_LORA_RANK = 1536
KV_LORA_RANK = 512
QK_NOPE_DIM = 128
QK_ROPE_DIM = 64
V_HEAD_DIM = 128

NVFP4_GROUP = 16                     # elements per F8_E4M3 block scale
FP8_BLOCK = 128                      # native fp8 weight_block_size [128, 128]
FORMS = ("nvfp4", "fp8")             # quantization form of the written checkpoint
DTYPE_BYTES = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
# safetensors' serializer sorts a file's tensors by dtype, descending in its `Dtype` enum order
# (..., U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, F64, ...), then name.
SAFETENSORS_DTYPE_RANK = {"F32": 0, "BF16": 1, "F8_E4M3": 2, "U8": 3}
ORDERS = ("safetensors", "module")   # data order inside a shard (see the module docstring)
HEADER_ALIGN = 8                     # safetensors pads the JSON header to a multiple of 8 bytes

# MLA attention projections: name -> (out_features, in_features)
ATTENTION_LINEARS: dict[str, tuple[int, int]] = {
    "q_a_proj": (Q_LORA_RANK, HIDDEN),
    "q_b_proj": (NUM_HEADS * (QK_NOPE_DIM + QK_ROPE_DIM), Q_LORA_RANK),
    "kv_a_proj_with_mqa": (KV_LORA_RANK + QK_ROPE_DIM, HIDDEN),
    "kv_b_proj": (NUM_HEADS * (QK_NOPE_DIM + V_HEAD_DIM), KV_LORA_RANK),
    "o_proj": (HIDDEN, NUM_HEADS * V_HEAD_DIM),
}
ATTENTION_NORMS: dict[str, int] = {"q_a_layernorm": Q_LORA_RANK, "kv_a_layernorm": KV_LORA_RANK}


def mlp_linears(inter: int) -> dict[str, tuple[int, int]]:
    """gate/up/down of one SwiGLU MLP with intermediate size `inter`: name -> (out, in)."""
    return {"gate_proj": (inter, HIDDEN), "up_proj": (inter, HIDDEN), "down_proj": (HIDDEN, inter)}


EXCLUDE_MODULES: list[str] = ["lm_head", "model.embed_tokens", "model.layers.*.mlp.gate"]


@dataclass(frozen=True, slots=True)
class Spec:
    """One tensor to write: its dtype, shape and (for real scalars) the float value to store."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    value: float | None = None       # F32 value written into every element (None: a file hole)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def nvfp4_linear(module: str, out_f: int, in_f: int, seed: int) -> list[Spec]:
    """The ModelOpt NVFP4 tensor set of one linear: packed E2M1 weight, block scales, two scalars."""
    weight_scale_2 = 1e-4 * (1.0 + (seed % 97) / 97.0)       # amax / (6 * 448), amax ~ 0.27..0.54
    input_scale = 2e-3 * (1.0 + (seed % 89) / 89.0)          # amax / (6 * 448) of the activations
    return [
        Spec(f"{module}.weight", "U8", (out_f, in_f // 2)),
        Spec(f"{module}.weight_scale", "F8_E4M3", (out_f, in_f // NVFP4_GROUP)),
        Spec(f"{module}.weight_scale_2", "F32", (), weight_scale_2),
        Spec(f"{module}.input_scale", "F32", (), input_scale),
    ]


def fp8_block_linear(module: str, out_f: int, in_f: int, seed: int) -> list[Spec]:
    """Native fp8 (DeepSeek-V3's own form): F8_E4M3 weight + F32 `weight_scale_inv` per 128x128 block."""
    scale = 2e-4 * (1.0 + (seed % 101) / 101.0)              # block amax / 448, amax ~ 0.09..0.18
    blocks = (math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK))
    return [Spec(f"{module}.weight", "F8_E4M3", (out_f, in_f)),
            Spec(f"{module}.weight_scale_inv", "F32", blocks, scale)]


LINEAR_FORMS = {"nvfp4": nvfp4_linear, "fp8": fp8_block_linear}


def bf16(name: str, *shape: int) -> Spec:
    return Spec(name, "BF16", tuple(shape))


def layer_specs(layer: int, form: str = "nvfp4") -> list[Spec]:
    """Every tensor of decoder layer `layer`."""
    linear = LINEAR_FORMS[form]
    p = f"model.layers.{layer}"
    specs = [bf16(f"{p}.input_layernorm.weight", HIDDEN), bf16(f"{p}.post_attention_layernorm.weight", HIDDEN)]
    for i, (proj, (out_f, in_f)) in enumerate(ATTENTION_LINEARS.items()):
        specs += linear(f"{p}.self_attn.{proj}", out_f, in_f, seed=layer * 7 + i)
    specs += [bf16(f"{p}.self_attn.{norm}.weight", size) for norm, size in ATTENTION_NORMS.items()]
    if layer < FIRST_DENSE:
        for i, (proj, (out_f, in_f)) in enumerate(mlp_linears(INTERMEDIATE).items()):
            specs += linear(f"{p}.mlp.{proj}", out_f, in_f, seed=layer * 11 + i)
        return specs
    specs += [
        bf16(f"{p}.mlp.gate.weight", ROUTED_EXPERTS, HIDDEN),
        Spec(f"{p}.mlp.gate.e_score_correction_bias", "F32", (ROUTED_EXPERTS,)),
    ]
    experts = [(f"{p}.mlp.experts.{e}", e) for e in range(ROUTED_EXPERTS)]
    experts.append((f"{p}.mlp.shared_experts", ROUTED_EXPERTS))
    for module, e in experts:
        inter = MOE_INTERMEDIATE * (SHARED_EXPERTS if module.endswith("shared_experts") else 1)
        for i, (proj, (out_f, in_f)) in enumerate(mlp_linears(inter).items()):
            specs += linear(f"{module}.{proj}", out_f, in_f, seed=layer * 1031 + e * 3 + i)
    return specs


def all_specs(form: str = "nvfp4") -> list[Spec]:
    """Every tensor of the checkpoint, in module order (embeddings first, head last)."""
    specs = [bf16("model.embed_tokens.weight", VOCAB, HIDDEN)]
    for layer in range(NUM_LAYERS):
        specs += layer_specs(layer, form)
    specs += [bf16("model.norm.weight", HIDDEN), bf16("lm_head.weight", VOCAB, HIDDEN)]
    return specs


def split_shards(specs: list[Spec], num_shards: int) -> list[list[Spec]]:
    """Greedy split in order into shards of about equal byte size (as `save_pretrained` does)."""
    budget = math.ceil(sum(s.nbytes for s in specs) / num_shards)
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > budget and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def data_order(specs: list[Spec], order: str = "safetensors") -> list[Spec]:
    """The tensors of one shard in data order: as safetensors writes them, or module order."""
    if order == "module":
        return list(specs)
    return sorted(specs, key=lambda s: (SAFETENSORS_DTYPE_RANK[s.dtype], s.name))


def write_shard(path: Path, specs: list[Spec], order: str = "safetensors") -> None:
    """Header + holes; the F32 scales are written as real little-endian values at their offsets."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    placed: list[tuple[int, Spec]] = []
    for spec in data_order(specs, order):
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        placed.append((offset, spec))
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    data_start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(data_start + offset)
        for start, spec in placed:
            if spec.value is not None:
                f.seek(data_start + start)
                f.write(struct.pack("<f", spec.value) * math.prod(spec.shape))


FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}   # deepseek-ai/DeepSeek-V3's own


def config_json(form: str = "nvfp4") -> dict:
    """config.json of DeepSeek-V3 with the ModelOpt NVFP4 (or its native fp8) quantization_config."""
    config = _config_json()
    if form == "fp8":
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return config


def _config_json() -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "first_k_dense_replace": FIRST_DENSE,
        "n_routed_experts": ROUTED_EXPERTS,
        "n_shared_experts": SHARED_EXPERTS,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "moe_layer_freq": 1,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_HEADS,
        "q_lora_rank": Q_LORA_RANK,
        "kv_lora_rank": KV_LORA_RANK,
        "qk_nope_head_dim": QK_NOPE_DIM,
        "qk_rope_head_dim": QK_ROPE_DIM,
        "v_head_dim": V_HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP,
            "exclude_modules": EXCLUDE_MODULES,
        },
    }


def hf_quant_config_json() -> dict:
    """hf_quant_config.json as ModelOpt 0.47 writes it, consistent with config.json."""
    return {
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP,
            "exclude_modules": EXCLUDE_MODULES,
        },
    }


def make_checkpoint(out: Path, num_shards: int = 72, order: str = "safetensors", form: str = "nvfp4") -> Path:
    """Write the checkpoint into `out` (created); return it. `order`: data order inside a shard;
    `form`: nvfp4 (ModelOpt) or fp8 (native block fp8, as DeepSeek-V3 ships)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    out.mkdir(parents=True, exist_ok=True)
    shards = split_shards(all_specs(form), num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, specs in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / name, specs, order)
        for spec in specs:
            weight_map[spec.name] = name
            total += spec.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config_json(form), indent=2))
    if form == "nvfp4":
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant_config_json(), indent=2))
    else:
        (out / "hf_quant_config.json").unlink(missing_ok=True)
    log.info("wrote %d tensors in %d shards (%.1f GB logical) to %s", len(weight_map), len(shards),
             total / 1e9, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--shards", type=int, default=72, help="number of shards (default 72)")
    parser.add_argument("--order", choices=ORDERS, default="safetensors",
                        help="data order inside a shard (default: as safetensors writes it)")
    parser.add_argument("--form", choices=FORMS, default="nvfp4",
                        help="nvfp4 (ModelOpt, default) or fp8 (native block fp8, DeepSeek-V3's own form)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_checkpoint(args.out, args.shards, args.order, args.form)
    return 0


if __name__ == "__main__":
    sys.exit(main())
