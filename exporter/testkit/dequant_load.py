"""Load an export back as a BF16 transformers model, through our own dequantizers.

Used to measure what quantization did to a model (logits versus the BF16 source) without any
serving engine: every quantized module of the export is dequantized with `quantgate.exporter.numerics`, the
state dict is rebuilt in the *source's* on-disk naming (per-expert modules of a fused source are
re-stacked into the fused 3-D tensors, transposed / interleaved back where the source was), written
as a plain BF16 checkpoint next to the source config, and loaded with the model's transformers class.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quantgate.exporter.schemes import lookup
from quantgate.exporter.schemes.apply import dequantize_stored
from quantgate.exporter.source import Source, open_source
from quantgate.validators.errors import QuantgateError
from quantgate.validators.fused_schemes import fused_storage
from quantgate.validators.layout import FusedSlice, Module
from quantgate.validators.schemes import COMPRESSED_TENSORS, FP8_NATIVE, MODELOPT, MXFP4, SchemeSpec, match_scheme

log = logging.getLogger(__name__)


def _mxfp4_native_fused(export: Source, module: Module, dtype: torch.dtype) -> tuple[str, torch.Tensor] | None:
    """GPT-OSS native mxfp4: `<t>_blocks` [E, out, in/32, 16] + `<t>_scales` -> (`<t>`, [E, in, out]),
    through the registry's native form."""
    from quantgate.exporter.schemes import lookup
    from quantgate.exporter.schemes.apply import dequantize_stored

    blocks, scales = module.tensors.get("blocks"), module.tensors.get("scales")
    if blocks is None or scales is None:
        return None
    entry, form = lookup(MXFP4, "MXFP4")
    w = dequantize_stored(entry, form, {"blocks": export.tensor(blocks.name), "scales": export.tensor(scales.name)},
                          dtype)
    return blocks.name.removesuffix("_blocks"), w.transpose(-1, -2).contiguous()   # the source's [E, in, out]


#: dialects whose fused experts are stored under their own names (not the source's): dialect -> reader
#: of one module's whole fused tensor, as (source tensor name, dequantized value in the source's orientation)
NATIVE_FUSED: dict[str, Callable[[Source, Module, torch.dtype], tuple[str, torch.Tensor] | None]] = {
    MXFP4: _mxfp4_native_fused,
}

Dequantizer = Callable[[Mapping[str, torch.Tensor], torch.dtype], torch.Tensor]


def dequantizer(spec: SchemeSpec) -> Dequantizer:
    """The registry's read-back of a validator spec (`quantgate.exporter.schemes`: the scheme whose
    form in the spec's dialect is, or also reads, that spec); QuantgateError when no entry has one."""
    found = lookup(spec.dialect, spec.name)
    if found is None:
        raise QuantgateError(f"cannot dequantize scheme {spec.key}")
    entry, form = found
    return lambda read, dtype: dequantize_stored(entry, form, read, dtype)


#: config.json `quant_method` -> dialect (anything else, or no config: ModelOpt's hf_quant_config.json)
QUANT_METHOD_DIALECTS: dict[str, str] = {COMPRESSED_TENSORS: COMPRESSED_TENSORS, "fp8": FP8_NATIVE, "mxfp4": MXFP4}
#: activation-side tensors a weight dequantizer never needs
ACTIVATION_SUFFIXES: frozenset[str] = frozenset({"input_scale", "input_global_scale"})


def export_dialect(export: Source) -> str:
    """The dialect of an export's quantization config (ModelOpt when it has none)."""
    qc = export.config.get("quantization_config") or {}
    return QUANT_METHOD_DIALECTS.get(qc.get("quant_method"), MODELOPT)


def dequantize_module(export: Source, module: Module, dtype: torch.dtype = torch.bfloat16,
                      dialect: str | None = None) -> torch.Tensor | None:
    """The [out, in] weight of one export module in `dtype`, or None when it is not quantized."""
    spec = match_scheme(dialect or export_dialect(export), module.tensors)
    if spec is None:
        return None
    try:
        dequantize = dequantizer(spec)
    except QuantgateError as exc:
        raise QuantgateError(f"{module.name}: {exc}") from None
    read = {suffix: export.tensor(info.name) for suffix, info in module.tensors.items()
            if suffix not in ACTIVATION_SUFFIXES}
    return dequantize(read, dtype)


def dequantize_fused(export: Source, module: Module, dtype: torch.dtype = torch.bfloat16,
                     dialect: str | None = None) -> torch.Tensor | None:
    """The whole fused 3-D tensor holding `module`, dequantized in its stored orientation ([E, in, out]
    when transposed), or None when it is not quantized. Each expert's slice is turned back to [out, in]
    (`quantgate.validators.schemes.expert_views`), dequantized by the scheme's 2-D dequantizer, and turned back."""
    assert module.fused is not None
    found = fused_storage(dialect or export_dialect(export), module.tensors, module.fused.transposed)
    if found is None:
        return None
    spec, transposed = found   # the stored orientation (the source's, for our exports)
    try:
        dequantize = dequantizer(spec)
    except QuantgateError as exc:
        raise QuantgateError(f"{module.fused.tensor}: {exc}") from None
    stored = {suffix: export.tensor(info.name) for suffix, info in module.tensors.items()
              if suffix not in ACTIVATION_SUFFIXES and suffix != "bias"}
    n_experts = export.info(module.fused.tensor).shape[0]

    def expert(t: torch.Tensor, e: int) -> torch.Tensor:
        if t.ndim == 3:
            return (t[e].t() if transposed else t[e]).contiguous()
        return t[e] if tuple(t.shape) == (n_experts,) else t   # stacked per-expert scalars

    experts = []
    for e in range(n_experts):
        read = {s: expert(t, e) for s, t in stored.items()}
        w = dequantize(read, dtype)   # [out, in]
        experts.append(w.t() if module.fused.transposed else w)   # back to the source's orientation
    return torch.stack(experts).contiguous()


def dequantized_state_dict(export_dir: str | Path, source: Source,
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every source tensor name -> its value in the export (dequantized where quantized)."""
    export = open_source(str(export_dir))
    dialect = export_dialect(export)
    matrices: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name, module in export.layout.modules.items():
        if module.fused is not None and dialect in NATIVE_FUSED:   # e.g. GPT-OSS `*_blocks` / `*_scales`
            found = NATIVE_FUSED[dialect](export, module, dtype) if module.fused.tensor not in seen else None
            seen.add(module.fused.tensor)
            if found is not None:
                state[found[0]] = found[1]
            continue
        if module.fused is not None:   # experts kept 3-D in the export (GPT-OSS / Llama4 under ModelOpt)
            if module.fused.tensor not in state and (whole := dequantize_fused(export, module, dtype, dialect)) is not None:
                state[module.fused.tensor] = whole
            continue
        w = dequantize_module(export, module, dtype, dialect)
        if w is not None:
            matrices[name] = w
    fused: dict[str, list[tuple[FusedSlice, str]]] = {}
    for name, module in source.layout.modules.items():
        if module.fused is not None and name in matrices:
            fused.setdefault(module.fused.tensor, []).append((module.fused, name))
        elif name in matrices and "weight" in module.tensors:
            state[module.tensors["weight"].name] = matrices[name]
    for tensor, slices in fused.items():
        state[tensor] = _restack(source, tensor, slices, matrices, dtype)
    for name in source.view.tensors:
        if name not in state and name in export.view.tensors:
            state[name] = export.tensor(name)
    missing = [n for n in source.view.tensors if n not in state and not _is_tied_head(source, n)]
    if missing:
        raise QuantgateError(f"export {export_dir} lacks {len(missing)} source tensor(s), e.g. {missing[0]}")
    return state


def _restack(source: Source, tensor: str, slices: list[tuple[FusedSlice, str]],
             matrices: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantgate.exporter.source.slice_fused`: per-expert [out, in] matrices -> the fused tensor."""
    info = source.info(tensor)
    fused = torch.zeros(tuple(info.shape), dtype=dtype)
    covered = 0
    for sl, name in slices:
        matrix = matrices[name]
        expert = fused[sl.expert].t() if sl.transposed else fused[sl.expert]   # view [out_total, in]
        if sl.rows is None:
            expert.copy_(matrix)
        elif sl.interleaved:
            half = sl.rows[0] // (sl.rows[1] - sl.rows[0])
            expert[half::2].copy_(matrix)
        else:
            expert[sl.rows[0]:sl.rows[1]].copy_(matrix)
        covered += matrix.numel()
    if covered != fused.numel():
        raise QuantgateError(f"{tensor}: the export's per-expert modules cover {covered} of {fused.numel()} values")
    return fused


def _is_tied_head(source: Source, name: str) -> bool:
    return source.tied_embeddings and name.startswith("lm_head")


def load_dequantized_model(export_dir: str | Path, source_dir: str | Path, *,
                           dtype: torch.dtype = torch.bfloat16) -> Any:
    """The export as a transformers model of the source's class, weights dequantized to `dtype`."""
    source = open_source(str(source_dir))
    return load_with_weights(source, dequantized_state_dict(export_dir, source, dtype), dtype=dtype)


def load_with_weights(source: Source, state: Mapping[str, torch.Tensor], *,
                      dtype: torch.dtype = torch.bfloat16) -> Any:
    """The source's model class loaded with `state` (tensors named as in the source checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="quantgate-dequant-") as tmp:
        write_checkpoint(source, state, tmp, extra_files=("generation_config.json",))
        return load_model(tmp, dtype=dtype)


def write_checkpoint(source: Source, state: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                     extra_files: tuple[str, ...] | None = None) -> Path:
    """A plain (unquantized) checkpoint of `state` with the source's config, minus any quantization.

    `extra_files`: source files copied along (default: every non-weight file, e.g. the tokenizer, so
    a serving engine can load the directory).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(source.config)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    names = source.other_files() if extra_files is None else list(extra_files)
    for rel in names:
        if rel in ("config.json", "hf_quant_config.json") or rel.endswith((".safetensors", ".index.json")):
            continue
        if (source.path / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.path / rel, out / rel)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def save_dequantized(export_dir: str | Path, source_dir: str | Path, out_dir: str | Path, *,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the export's weights, dequantized by our numerics, as a plain checkpoint in the source's naming."""
    source = open_source(str(source_dir))
    return write_checkpoint(source, dequantized_state_dict(export_dir, source, dtype), out_dir)


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Any:
    """`from_pretrained` of the class named in config.json `architectures` (never remote code)."""
    import transformers

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    return model.eval()
