"""The native `mxfp4` dialect writer: GPT-OSS's routed experts as OpenAI's release stores them.

Reference: shared/reference/formats_beyond_two.md §1 and §3, `quantgate.validators.dialects_mxfp4` (the
facts the validator checks this form against). vLLM `quantization/mxfp4.py` builds every Linear BF16
("MXFP4 linear layer is not implemented") and every FusedMoE as `Mxfp4MoEMethod`; only
`models/gpt_oss.py::_load_weights_mxfp4` (vLLM and SGLang) reads the fused per-layer tensors. So:

* Each MoE layer's two transposed 3-D BF16 tensors (`experts.gate_up_proj` [E, H, 2I], gate/up
  interleaved along the last dim, and `experts.down_proj` [E, I, H]) become
  `<t>_blocks` U8 [E, out, in/32, 16] (two E2M1 codes per byte, element 2k in the low nibble) and
  `<t>_scales` U8 [E, out, in/32] (E8M0 exponents): each expert's matrix is turned to [out, in] and
  quantized in blocks of 32 along the input dim, rows kept in the source's (interleaved) order, which
  is the order transformers' `convert_moe_packed_tensors` and the engines' loaders read back.
  `<t>_bias` passes through unchanged (same name, BF16).
* Everything else (attention, router, embeddings, norms, lm_head) is copied BF16.
* config.json `quantization_config` = {"modules_to_not_convert": [...], "quant_method": "mxfp4"}: the
  engines never read the list (QG140); transformers does, so it names every module left BF16.

Which models can be written so is data (the registry form's `architectures`), not a model-family branch; any
other model, or a plan that leaves experts BF16, is refused before a weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from quantgate.exporter.jsonfile import write_json_atomic
from quantgate.exporter.recipes import Plan
from quantgate.exporter.source import Source
from quantgate.exporter.writers.bmm_experts import BmmJob, build_bmm_units
from quantgate.exporter.writers.common import InputScales
from quantgate.exporter.writers.compressed_tensors import ignore_list
from quantgate.exporter.writers.shard_plan import OutTensor, Unit
from quantgate.validators.errors import UnsupportedArchitectureError
from quantgate.validators.layout import Kind
from quantgate.validators.schemes import MXFP4, SchemeSpec

log = logging.getLogger(__name__)

QUANT_METHOD = "mxfp4"


def output_tensors(tensor: str, shape: tuple[int, ...], spec: SchemeSpec) -> tuple[OutTensor, ...]:
    """`<t>_blocks` / `<t>_scales` for a stored [E, in, out] tensor: per expert in [out, in] orientation
    (the scheme table's shapes), with the leading expert dim."""
    n_experts, in_f, out_f = shape
    return tuple(OutTensor(f"{tensor}_{t.suffix}", t.dtypes[0], (n_experts, *t.shape(out_f, in_f)))
                 for t in spec.tensors if t.required)


def check_native_plan(source: Source, plan: Plan) -> None:
    """Refuse what this form cannot hold: a model whose loaders do not read it, or experts left BF16
    (no engine can keep an MoE layer BF16 under mxfp4: every FusedMoE is built MXFP4, QG440)."""
    from quantgate.exporter.schemes import lookup

    form = lookup(MXFP4, "MXFP4")[1]
    arch = source.architecture or "this model"
    if not form.loaded_for(source.architecture):
        raise UnsupportedArchitectureError(
            f"the native mxfp4 form (experts.*_blocks / *_scales) is loaded for {', '.join(form.architectures)} "
            f"only, not {arch}; write MXFP4 as compressed-tensors (--dialect compressed-tensors)")
    experts = list(source.layout.by_kind(Kind.EXPERT))
    bf16 = [m.name for m in experts if not plan.assignments[m.name].quantized]
    if bf16 or not experts:
        raise UnsupportedArchitectureError(
            f"under mxfp4 vLLM and SGLang build every MoE layer MXFP4, but {len(bf16) or 'all'} expert module(s) "
            f"would stay BF16 (e.g. {bf16[0] if bf16 else 'no experts found'}); quantize every expert, or write "
            "compressed-tensors (--dialect compressed-tensors), where experts can be listed in `ignore`")


def build_native_units(source: Source, plan: Plan) -> list[Unit]:
    check_native_plan(source, plan)
    return build_bmm_units(source, plan, output_tensors)


def quantize_native(job: BmmJob, source: Source, scales: InputScales, device: torch.device,
                    weights: torch.Tensor | None = None, numerics: str | None = None) -> dict[str, torch.Tensor]:
    """`<t>_blocks` and `<t>_scales` of one fused [E, in, out] tensor (`numerics`, ModelOpt's rounding
    modes, does not apply: MXFP4's scales are powers of two)."""
    from quantgate.exporter.schemes import lookup
    from quantgate.exporter.schemes.apply import quantize

    entry, form = lookup(MXFP4, job.spec.name)   # the registry's native form (its own numerics and names)
    num = entry.numerics_for(form)
    if weights is not None:   # the whole [E, in, out] tensor, read by BmmJob.read, quantized as [E, out, in]
        outs = quantize(num, weights.transpose(-1, -2))
    else:                     # larger than WHOLE_READ_MAX: one expert at a time (no shared scale to find first)
        parts = [quantize(num, source.expert_tensor(job.tensor, e, pin=device.type == "cuda")
                          .to(device, non_blocking=True).t())
                 for e in range(source.info(job.tensor).shape[0])]
        outs = tuple(torch.stack([p[i] for p in parts]) for i in range(len(num.outputs)))
    return {f"{job.tensor}_{form.suffix(name)}": t.contiguous() for name, t in zip(num.outputs, outs)}


def quantization_config(source: Source, plan: Plan) -> dict:
    """config.json `quantization_config`, keys as the gpt-oss release orders them."""
    return {"modules_to_not_convert": ignore_list(source, plan), "quant_method": QUANT_METHOD}


def prepare_configs(source: Source, plan: Plan) -> Callable[[Path], None]:
    check_native_plan(source, plan)
    qc = quantization_config(source, plan)

    def write(out_dir: Path) -> None:
        config = dict(source.config)
        config["quantization_config"] = qc
        write_json_atomic(out_dir / "config.json", config, indent=2)
    return write


__all__ = ["QUANT_METHOD", "build_native_units", "check_native_plan", "output_tensors",
           "prepare_configs", "quantization_config", "quantize_native"]
