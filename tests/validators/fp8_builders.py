"""Test-only builder: a real tiny BF16 model dir -> a Hugging Face native `fp8` checkpoint, written
the way DeepSeek-V3 / Qwen3-*-FP8 ship (reference formats_beyond_two.md §2), then broken on purpose.

Block form: every quantized linear gets `weight` float8_e4m3fn [out, in] and `weight_scale_inv` F32
[ceil(out/b0), ceil(in/b1)] with w ~= q * scale per block (scale = block amax / 448); per-tensor form:
`weight_scale` (+ `input_scale` when static). Routers, norms, embeddings and lm_head stay BF16.
config.json gets `quantization_config = {quant_method: fp8, activation_scheme, fmt, weight_block_size,
<exclusion key>}`. Tensor values are real; only the tiny dimensions are not DeepSeek's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from qc_builders import _source, module_weight
from safetensors.torch import save_file

from quantgate.validators.layout import Module

E4M3_MAX = 448.0
QUANTIZED_KINDS = frozenset({"attention", "mlp", "shared_expert", "expert"})
ACT_AMAX = 4.0


@dataclass
class Fp8Checkpoint:
    tensors: dict[str, torch.Tensor]
    config: dict
    quantization_config: dict
    modules: dict[str, Module] = field(default_factory=dict)


def block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [out, in], F32 weight_scale_inv [ceil(out/b0), ceil(in/b1)]), w ~= q * scale."""
    b0, b1 = block
    out_f, in_f = w.shape
    rows, cols = -(-out_f // b0), -(-in_f // b1)
    padded = torch.zeros(rows * b0, cols * b1, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.reshape(rows, b0, cols, b1)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).reshape(rows * b0, cols * b1)
    return q[:out_f, :in_f].to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def tensor_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.float().abs().max()
    scale = amax / E4M3_MAX if amax > 0 else torch.tensor(1.0)
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale.reshape(()).float()


def build_fp8(src: Path, out: Path, *, block: tuple[int, int] | None = (128, 128), activation_scheme: str = "dynamic",
              experts: str = "quantize", exclusion_key: str | None = "modules_to_not_convert",
              exclude: list[str] | None = None, mutate: Callable[[Fp8Checkpoint], None] | None = None) -> Path:
    """Write `out` as a native fp8 checkpoint of the BF16 model `src`.

    experts: "quantize" or "bf16" (routed experts left BF16 and not excluded). exclude: the exclusion
    list (default: lm_head + every router by exact name, as Qwen3-30B-A3B-FP8 writes it); written
    under `exclusion_key`, or not at all when that is None (DeepSeek-V3 ships no list).
    """
    tensors, config, layout = _source(src)
    new: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    names: list[str] = ["lm_head"]
    for m in layout.modules.values():
        kind = m.kind.value
        if kind == "router":
            names.append(m.name)
        if kind not in QUANTIZED_KINDS or (kind == "expert" and experts != "quantize"):
            continue
        w = module_weight(tensors, m)
        if block is not None:
            q, s = block_quantize(w, block)
            new[f"{m.name}.weight"], new[f"{m.name}.weight_scale_inv"] = q, s
        else:
            q, s = tensor_quantize(w)
            new[f"{m.name}.weight"], new[f"{m.name}.weight_scale"] = q, s
            if activation_scheme == "static":
                new[f"{m.name}.input_scale"] = torch.tensor(ACT_AMAX / E4M3_MAX, dtype=torch.float32)
        consumed.update(t.name for t in m.tensors.values())
        if m.fused is not None:
            consumed.add(m.fused.tensor)
    for name, t in tensors.items():
        if name not in consumed:
            new[name] = t
    qconf: dict = {"activation_scheme": activation_scheme, "fmt": "e4m3", "quant_method": "fp8"}
    if block is not None:
        qconf["weight_block_size"] = list(block)
    if exclusion_key is not None:
        qconf[exclusion_key] = exclude if exclude is not None else names
    ck = Fp8Checkpoint(new, dict(config), qconf, dict(layout.modules))
    if mutate is not None:
        mutate(ck)
    return write_fp8(ck, out)


def write_fp8(ck: Fp8Checkpoint, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = dict(ck.config)
    config["quantization_config"] = ck.quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in ck.tensors.items()}, str(out / "model.safetensors"))
    return out


# ---- mutations -----------------------------------------------------------------------------------
def first(ck: Fp8Checkpoint, *fragments: str) -> str:
    return next(n for n in sorted(ck.tensors) if all(f in n for f in fragments))


def fill(value: float, *fragments: str, index: tuple[int, int] = (0, 0)) -> Callable[[Fp8Checkpoint], None]:
    """Set one element of the first tensor matching `fragments` (a block scale) to `value`."""
    def mutate(ck: Fp8Checkpoint) -> None:
        name = first(ck, *fragments)
        t = ck.tensors[name].clone()
        if t.dim() == 0:
            t = torch.tensor(value, dtype=t.dtype)
        else:
            t[index] = value
        ck.tensors[name] = t
    return mutate


def reshape_scale(*fragments: str) -> Callable[[Fp8Checkpoint], None]:
    """Store a block scale transposed ([in/b1, out/b0]): a wrong scale shape."""
    def mutate(ck: Fp8Checkpoint) -> None:
        name = first(ck, *fragments)
        ck.tensors[name] = torch.ones(ck.tensors[name].shape[1], ck.tensors[name].shape[0] + 1)
    return mutate


def qconfig(**changes) -> Callable[[Fp8Checkpoint], None]:
    """Change quantization_config keys (None deletes a key)."""
    def mutate(ck: Fp8Checkpoint) -> None:
        for key, value in changes.items():
            if value is None:
                ck.quantization_config.pop(key, None)
            else:
                ck.quantization_config[key] = value
    return mutate


def chain(*mutations: Callable[[Fp8Checkpoint], None]) -> Callable[[Fp8Checkpoint], None]:
    def mutate(ck: Fp8Checkpoint) -> None:
        for m in mutations:
            m(ck)
    return mutate


def to_bf16(module: str) -> Callable[[Fp8Checkpoint], None]:
    """Store `module` as a BF16 weight of its logical shape, without scales (left unquantized)."""
    def mutate(ck: Fp8Checkpoint) -> None:
        weight = ck.tensors[f"{module}.weight"]
        for suffix in ("weight_scale_inv", "weight_scale", "input_scale"):
            ck.tensors.pop(f"{module}.{suffix}", None)
        ck.tensors[f"{module}.weight"] = torch.zeros(weight.shape, dtype=torch.bfloat16)
    return mutate


def drop(*fragments: str) -> Callable[[Fp8Checkpoint], None]:
    def mutate(ck: Fp8Checkpoint) -> None:
        del ck.tensors[first(ck, *fragments)]
    return mutate


def retype(dtype: torch.dtype, *fragments: str) -> Callable[[Fp8Checkpoint], None]:
    def mutate(ck: Fp8Checkpoint) -> None:
        name = first(ck, *fragments)
        ck.tensors[name] = ck.tensors[name].clamp(0, 255).to(dtype)
    return mutate


def exclude_more(*names: str) -> Callable[[Fp8Checkpoint], None]:
    """Append entries to the config's exclusion list (whichever key it uses)."""
    def mutate(ck: Fp8Checkpoint) -> None:
        key = next((k for k in ("ignored_layers", "modules_to_not_convert") if k in ck.quantization_config),
                   "modules_to_not_convert")
        ck.quantization_config[key] = list(ck.quantization_config.get(key, [])) + list(names)
    return mutate


def quantize_lm_head(ck: Fp8Checkpoint) -> None:
    """Store lm_head as block fp8 (the engines build ParallelLMHead unquantized under fp8)."""
    q, s = block_quantize(ck.tensors["lm_head.weight"], (128, 128))
    ck.tensors["lm_head.weight"], ck.tensors["lm_head.weight_scale_inv"] = q, s
