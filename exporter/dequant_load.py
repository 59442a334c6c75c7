"""Load an export back as a BF16 transformers model, through our own dequantizers.

Used to measure what quantization did to a model (logits versus the BF16 source) without any
serving engine: every quantized module of the export is dequantized with `exporter.numerics`, the
state dict is rebuilt in the *source's* on-disk naming (per-expert modules of a fused source are
re-stacked into the fused 3-D tensors, transposed / interleaved back where the source was), written
as a plain BF16 checkpoint next to the source config, and loaded with the model's transformers class.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from exporter.source import Source, open_source
from validators.errors import QuantgateError
from validators.layout import FusedSlice, Module
from validators.schemes import match_scheme

log = logging.getLogger(__name__)


def dequantize_module(export: Source, module: Module, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
    """The [out, in] weight of one export module in `dtype`, or None when it is not quantized."""
    spec = match_scheme("modelopt", module.tensors)
    if spec is None or spec.quant_algo is None:
        return None
    read = {suffix: export.tensor(info.name) for suffix, info in module.tensors.items() if suffix != "input_scale"}
    if spec.quant_algo in ("NVFP4", "W4A16_NVFP4"):
        from exporter.numerics.nvfp4 import dequantize_nvfp4

        return dequantize_nvfp4(read["weight"], read["weight_scale"], read["weight_scale_2"], dtype=dtype)
    if spec.quant_algo == "FP8":
        from exporter.numerics.fp8 import dequantize_fp8

        return dequantize_fp8(read["weight"], read["weight_scale"], dtype=dtype)
    raise QuantgateError(f"{module.name}: cannot dequantize scheme {spec.name}")


def dequantized_state_dict(export_dir: str | Path, source: Source,
                           dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every source tensor name -> its value in the export (dequantized where quantized)."""
    export = open_source(str(export_dir))
    matrices: dict[str, torch.Tensor] = {}
    for name, module in export.layout.modules.items():
        w = dequantize_module(export, module, dtype)
        if w is not None:
            matrices[name] = w
    state: dict[str, torch.Tensor] = {}
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
    """Inverse of `exporter.source.slice_fused`: per-expert [out, in] matrices -> the fused tensor."""
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
        config = dict(source.config)
        config.pop("quantization_config", None)
        (Path(tmp) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        for extra in ("generation_config.json",):
            if (source.path / extra).is_file():
                shutil.copy2(source.path / extra, Path(tmp) / extra)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        return load_model(tmp, dtype=dtype)


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Any:
    """`from_pretrained` of the class named in config.json `architectures` (never remote code)."""
    import transformers

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    return model.eval()
