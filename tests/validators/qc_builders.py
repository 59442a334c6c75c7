"""Test-only builders: turn a real tiny BF16 model dir into a ModelOpt (or compressed-tensors)
quantized checkpoint the way ModelOpt 0.47 / llm-compressor 0.14 write it, then break it on purpose.

Tensor sets, dtypes and shapes come from `quantgate.validators.schemes`; values from the project's real
numerics (`quantgate.exporter.numerics.nvfp4` / `fp8`). Fused 3-D experts are un-fused per expert (ModelOpt
>= 0.44), or left fused BF16 with `experts="bf16_fused"` (the ModelOpt 0.41-0.43 Gemma4 bug).
This is deliberately small: the product writer is exporter/writers/modelopt.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantgate.exporter.numerics.fp8 import activation_scale, fp8_scale, quantize_fp8
from quantgate.exporter.numerics.nvfp4 import ct_global_scale, quantize_nvfp4, shared_global_scale
from quantgate.validators.layout import Layout, Module, build_layout
from quantgate.validators.safetensors_header import read_header

QUANTIZED_KINDS = frozenset({"attention", "mlp", "shared_expert", "expert"})
ACT_AMAX = 4.0                       # plausible activation amax for every static input scale
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class QCheckpoint:
    """A checkpoint being built: mutate any field before it is written."""

    tensors: dict[str, torch.Tensor]
    config: dict
    exclude: list[str]
    quant_algo: str
    layout: Layout                                   # of the BF16 source
    hf_quant_config: dict | None = None              # None: derived from quant_algo / exclude
    write_hf_quant_config: bool = True
    extra: dict = field(default_factory=dict)

    def scalar(self, name: str, value: float) -> None:
        self.tensors[name] = torch.tensor(value, dtype=torch.float32)


def _source(src: Path) -> tuple[dict[str, torch.Tensor], dict, Layout]:
    tensors: dict[str, torch.Tensor] = {}
    headers = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
        headers.update(read_header(f).tensors)
    config = json.loads((src / "config.json").read_text())
    return tensors, config, build_layout(headers, config)


def module_weight(tensors: dict[str, torch.Tensor], m: Module) -> torch.Tensor:
    """[out, in] weight of a module; virtual per-expert modules are sliced from the fused tensor."""
    if m.fused is None:
        return tensors[m.tensors["weight"].name]
    w = tensors[m.fused.tensor][m.fused.expert]
    if m.fused.transposed:
        w = w.transpose(0, 1)
    if m.fused.rows is not None:
        lo, hi = m.fused.rows
        w = w[0::2] if m.fused.interleaved and lo == 0 else w[1::2] if m.fused.interleaved else w[lo:hi]
    return w.contiguous()


def _group_key(m: Module) -> str:
    return m.fused_group or m.name


def _exclude_for(m: Module) -> str:
    kind = m.kind.value
    if kind in ("vision", "projector"):
        marker = next(p for p in ("vision_tower", "embed_vision", "vision_model", "visual", "multi_modal_projector")
                      if p in m.name) if any(p in m.name for p in ("vision_tower", "embed_vision", "vision_model",
                                                                   "visual", "multi_modal_projector")) else None
        if marker:
            return m.name[: m.name.index(marker) + len(marker)] + "*"
    return m.name


def build(src: Path, out: Path, *, scheme: str = "NVFP4", experts: str = "quantize",
          mutate: Callable[[QCheckpoint], None] | None = None, shards: int = 1) -> Path:
    """Write `out` as a ModelOpt-dialect `scheme` ("NVFP4" | "FP8") checkpoint of the BF16 model `src`.

    experts: "quantize" (un-fused per expert, ModelOpt >= 0.44), "bf16_fused" (left as the fused BF16
    3-D tensors and not excluded: ModelOpt 0.41-0.43 on Gemma4).
    """
    tensors, config, layout = _source(src)
    new: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    exclude: list[str] = ["lm_head"]
    groups: dict[str, list[Module]] = {}
    for m in layout.modules.values():
        if m.kind.value in QUANTIZED_KINDS and not (m.kind.value == "expert" and experts != "quantize"):
            groups.setdefault(_group_key(m), []).append(m)
    for members in groups.values():
        weights = [module_weight(tensors, m) for m in members]
        if scheme == "NVFP4":
            ws2 = shared_global_scale(weights)
            for m, w in zip(members, weights):
                packed, block, ws2_m = quantize_nvfp4(w, ws2)
                new[f"{m.name}.weight"], new[f"{m.name}.weight_scale"] = packed, block
                new[f"{m.name}.weight_scale_2"] = ws2_m
                new[f"{m.name}.input_scale"] = activation_scale(torch.tensor(ACT_AMAX), "NVFP4")
        else:
            scale = fp8_scale(torch.stack([w.abs().max().float() for w in weights]).max())
            for m, w in zip(members, weights):
                q, s = quantize_fp8(w, scale)
                new[f"{m.name}.weight"], new[f"{m.name}.weight_scale"] = q, s
                new[f"{m.name}.input_scale"] = activation_scale(torch.tensor(ACT_AMAX), "FP8")
        for m in members:
            consumed.update(t.name for t in m.tensors.values())
            if m.fused is not None:
                consumed.add(m.fused.tensor)
    for m in layout.modules.values():
        if m.kind.value in ("router", "lm_head", "vision", "projector", "other"):
            pattern = _exclude_for(m)
            if pattern not in exclude and m.kind.value != "lm_head":
                exclude.append(pattern)
    for name, t in tensors.items():
        if name not in consumed:
            new[name] = t
    qc = QCheckpoint(new, config, exclude, scheme, layout)
    if mutate is not None:
        mutate(qc)
    return write(qc, out, shards=shards)


def write(qc: QCheckpoint, out: Path, *, shards: int = 1) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    nested = qc.hf_quant_config or {
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quantization": {"quant_algo": qc.quant_algo, "kv_cache_quant_algo": None,
                         **({"group_size": 16} if qc.quant_algo == "NVFP4" else {}),
                         "exclude_modules": sorted(qc.exclude)}}
    config = dict(qc.config)
    if "quantization_config" not in qc.extra.get("keep_config_keys", ()):
        bits = 4 if qc.quant_algo == "NVFP4" else 8
        args = {"dynamic": False, "num_bits": bits, "type": "float", **({"group_size": 16} if bits == 4 else {})}
        config["quantization_config"] = {
            "config_groups": {"group_0": {"input_activations": args, "weights": args, "targets": ["Linear"]}},
            "ignore": sorted(qc.exclude), "quant_algo": qc.quant_algo,
            "producer": {"name": "modelopt", "version": "0.47.0"}, "quant_method": "modelopt"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if qc.write_hf_quant_config:
        (out / "hf_quant_config.json").write_text(json.dumps(nested, indent=2))
    write_shards({k: v.clone().contiguous() for k, v in qc.tensors.items()}, out, shards)
    return out


def write_shards(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"))
        return
    weight_map: dict[str, str] = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / fname))
        weight_map.update({n: fname for n in part})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def build_ct_nvfp4(src: Path, out: Path) -> Path:
    """A compressed-tensors NVFP4 checkpoint shaped like llm-compressor 0.14's output
    (reference lab_llmc_vllm.md Part 1): weight_packed / weight_scale / weight_global_scale [1] /
    input_global_scale [1] (reciprocal convention), routers and lm_head in `ignore` by exact name."""
    tensors, config, layout = _source(src)
    new: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    ignore: list[str] = []
    groups: dict[str, list[Module]] = {}
    for m in layout.modules.values():
        if m.kind.value in QUANTIZED_KINDS:
            groups.setdefault(_group_key(m), []).append(m)
        elif m.kind.value == "router":
            ignore.append(m.name)
    for members in groups.values():
        weights = [module_weight(tensors, m) for m in members]
        ws2 = shared_global_scale(weights)
        for m, w in zip(members, weights):
            packed, block, _ = quantize_nvfp4(w, ws2)
            new[f"{m.name}.weight_packed"], new[f"{m.name}.weight_scale"] = packed, block
            new[f"{m.name}.weight_global_scale"] = ct_global_scale(ws2).reshape(1)
            new[f"{m.name}.input_global_scale"] = ct_global_scale(
                activation_scale(torch.tensor(ACT_AMAX), "NVFP4")).reshape(1)
            consumed.update(t.name for t in m.tensors.values())
    for name, t in tensors.items():
        if name not in consumed:
            new[name] = t
    args = {"actorder": None, "block_structure": None, "group_size": 16, "num_bits": 4, "observer_kwargs": {},
            "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True, "type": "float",
            "zp_dtype": None}
    config = dict(config)
    config["quantization_config"] = {
        "config_groups": {"group_0": {
            "format": "nvfp4-pack-quantized", "output_activations": None, "targets": ["Linear"],
            "input_activations": {**args, "dynamic": "local", "observer": "static_minmax"},
            "weights": {**args, "dynamic": False, "observer": "memoryless_minmax"}}},
        "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": ignore + ["lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.19.0"}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.clone().contiguous() for k, v in new.items()}, str(out / "model.safetensors"))
    return out


# ---- mutations (pass to build(mutate=...)) -------------------------------------------------------
def first(qc: QCheckpoint, *fragments: str) -> str:
    """The first tensor name containing every fragment (sorted, so deterministic)."""
    return next(n for n in sorted(qc.tensors) if all(f in n for f in fragments))


def drop(*fragments: str) -> Callable[[QCheckpoint], None]:
    def mutate(qc: QCheckpoint) -> None:
        del qc.tensors[first(qc, *fragments)]
    return mutate


def set_scalar(value: float, *fragments: str) -> Callable[[QCheckpoint], None]:
    def mutate(qc: QCheckpoint) -> None:
        qc.scalar(first(qc, *fragments), value)
    return mutate


def add_exclude(*patterns: str) -> Callable[[QCheckpoint], None]:
    def mutate(qc: QCheckpoint) -> None:
        qc.exclude.extend(patterns)
    return mutate


def chain(*mutations: Callable[[QCheckpoint], None]) -> Callable[[QCheckpoint], None]:
    def mutate(qc: QCheckpoint) -> None:
        for m in mutations:
            m(qc)
    return mutate
