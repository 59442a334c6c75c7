"""Transposed 3-D ("BMM") experts kept 3-D, as ModelOpt writes them for GPT-OSS and Llama4.

GPT-OSS (`GptOssExperts`) and Llama4 (`Llama4TextExperts`) store their routed experts as
`experts.gate_up_proj` [E, H, 2I] (GPT-OSS: gate/up interleaved along the last dim, plus
`gate_up_proj_bias` [E, 2I]) and `experts.down_proj` [E, I, H], i.e. `x @ W[e]`: [E, in, out].
ModelOpt (`unified_export_hf._export_quantized_weight`, reference/modelopt.md §2 "Llama4/GptOss
stay 3-D") does not unfuse them: one weight quantizer per projection covers every expert, and the
export keeps the fused name with prefixed scales:

* NVFP4: `<t>` U8 [E, in/2, out], `<t>_weight_scale` F8_E4M3 [E, in/16, out] (each expert's
  matrix is transposed to [out, in], quantized in blocks of 16 along the INPUT dim, and the result
  transposed back: `maybe_transpose_expert_weight_dimensions`), `<t>_weight_scale_2` F32 [] (from
  the amax of the whole 3-D tensor, so gate and up of every expert share it) and `<t>_input_scale`
  F32 [] (one input quantizer per projection: the max over experts).
* FP8: `<t>` F8_E4M3 [E, in, out], `<t>_weight_scale` F32 [] and `<t>_input_scale` F32 [].

Biases and routers pass through unchanged. The numerics are the scheme registry's
(`quantgate.exporter.schemes`), applied to the whole stack viewed as [E, out, in] in one call with the
tensor's shared per-tensor scale; nothing here is a second implementation of a number format.

The compressed-tensors dialect has no 3-D expert form that an engine loads (llm-compressor
linearizes these experts to per-expert 2-D modules, and its 3-D `*_packed` output is the
llm-compressor #2939 hazard), so that dialect is refused for these experts (`check_bmm_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.recipes import Plan
from quantgate.exporter.schemes import experts_3d_specs, lookup
from quantgate.exporter.source import Source
from quantgate.exporter.writers.shard_plan import OutTensor, Unit
from quantgate.validators.errors import UnsupportedArchitectureError
from quantgate.validators.layout import Module
from quantgate.validators.schemes import MODELOPT, SchemeSpec

if TYPE_CHECKING:
    from quantgate.exporter.writers.common import InputScales

#: Larger 3-D tensors (Llama4 Maverick's gate_up_proj is 21 GB in BF16) are streamed expert by expert.
WHOLE_READ_MAX = 1 << 30
#: Why a dialect has no 3-D expert form (the refusal message names it).
UNSUPPORTED_DIALECT_REASONS: dict[str, str] = {
    "compressed-tensors": "compressed-tensors has no 3-D expert form that vLLM or SGLang load (llm-compressor "
                          "linearizes these experts into per-expert 2-D modules, a form quantgate does not write "
                          "for them; its fused 3-D `*_packed` output is mapped by neither engine: "
                          "llm-compressor #2939)",
}


@dataclass(frozen=True)
class BmmJob:
    """Quantize one transposed 3-D expert tensor [E, in, out] as a whole (all its virtual modules)."""

    tensor: str                      # the fused tensor, e.g. `model.layers.0.mlp.experts.gate_up_proj`
    modules: tuple[Module, ...]      # its virtual per-expert modules (for input scales and byte counts)
    spec: SchemeSpec

    def read(self, source: Source, device: torch.device) -> torch.Tensor | None:
        """The stored [E, in, out] tensor on `device`, or None when it is larger than `WHOLE_READ_MAX`
        bytes (`quantize_bmm` then reads it one expert at a time, twice: amax, then quantize)."""
        if source.info(self.tensor).nbytes > WHOLE_READ_MAX:
            return None
        return source.tensor(self.tensor, pin=device.type == "cuda").to(device, non_blocking=True)


def is_bmm(module: Module) -> bool:
    """A virtual expert of a transposed 3-D tensor (decided by the layout, not by model family)."""
    return module.fused is not None and module.fused.transposed


def output_name(tensor: str, suffix: str) -> str:
    """ModelOpt's prefixed name: `weight` keeps the tensor name, a scale is `<tensor>_<suffix>`."""
    return tensor if suffix == "weight" else f"{tensor}_{suffix}"


def output_tensors(tensor: str, shape: tuple[int, ...], spec: SchemeSpec) -> tuple[OutTensor, ...]:
    """The scheme table's tensors for a 3-D [E, in, out] weight: per-expert [out, in]-shaped tensors
    are stored transposed and stacked ([E, ..., out]); per-tensor scalars stay scalars."""
    n_experts, in_f, out_f = shape
    result = []
    for t in spec.tensors:
        if not t.required:
            continue
        planned = tuple(t.shape(out_f, in_f))
        stored = () if planned == () else (n_experts, *planned[::-1])
        result.append(OutTensor(output_name(tensor, t.suffix), t.dtypes[0], stored))
    return tuple(result)


def bmm_groups(source: Source, plan: Plan) -> dict[str, list[Module]]:
    groups: dict[str, list[Module]] = {}
    for name in plan.assignments:
        module = source.layout.modules[name]
        if is_bmm(module):
            groups.setdefault(module.fused.tensor, []).append(module)   # type: ignore[union-attr]
    return groups


def check_bmm_plan(plan: Plan, source: Source, dialect: str) -> None:
    """Refuse, before anything is read, what the 3-D writer cannot write: a dialect without a 3-D
    expert form, a scheme other than NVFP4/FP8, one tensor's experts split between schemes (a 3-D
    tensor has one quantizer, so it is quantized whole or kept BF16 whole), or a mixed-precision plan
    (ModelOpt keys 3-D experts by their container in `quantized_layers`, which is not written yet)."""
    mixed = len({a.scheme.name for a in plan.assignments.values() if a.scheme is not None}) > 1
    bmm_specs = experts_3d_specs()   # dialect -> specs with a 3-D expert form (ModelOpt's; mxfp4_native's)
    for tensor, members in bmm_groups(source, plan).items():
        schemes = {plan.assignments[m.name].scheme for m in members}
        quantized = {s for s in schemes if s is not None}
        if not quantized:
            continue
        where = f"{source.architecture or 'this model'} stores its experts as transposed 3-D tensors ({tensor})"
        if dialect not in bmm_specs:
            reason = UNSUPPORTED_DIALECT_REASONS.get(dialect, f"the {dialect} dialect has no 3-D expert form")
            raise UnsupportedArchitectureError(
                f"{where}; {reason}. {_bmm_alternatives(next(iter(quantized)), source.architecture)}")
        if len(schemes) > 1:
            raise UnsupportedArchitectureError(
                f"{where}; its experts were given different schemes ({sorted(s.name if s else 'BF16' for s in schemes)}), "
                "but a 3-D tensor is quantized whole. Quantize all experts of the layer or exclude them all "
                "(--exclude '*experts*')")
        if mixed:
            raise UnsupportedArchitectureError(
                f"{where}; a mixed-precision plan would key these experts in `quantized_layers`, a form "
                "quantgate has not modelled for 3-D experts. Use one scheme (nvfp4 or fp8), or exclude the "
                "experts with --exclude '*experts*'")
        spec = next(iter(quantized))
        if spec.name not in bmm_specs[dialect]:
            raise UnsupportedArchitectureError(
                f"{where}; quantgate writes these 3-D experts as {dialect} in {', '.join(sorted(bmm_specs[dialect]))} "
                f"only, not {spec.name}. Choose another recipe, or keep the experts BF16 with --exclude '*experts*'")


def _bmm_alternatives(spec: SchemeSpec, architecture: str | None) -> str:
    """What the user can do instead: the dialects in which this scheme has a 3-D expert form this
    architecture's loaders read, if any."""
    from quantgate.exporter.schemes import lookup

    found = lookup(spec.dialect, spec.name)
    dialects = [f.dialect for f in found[0].forms
                if f.experts_3d and f.writable and f.loaded_for(architecture)] if found else []
    keep = "keep the experts BF16 with --exclude '*experts*'"
    if not dialects:
        return f"No engine-loaded 3-D form of {spec.name} is written by quantgate: {keep}"
    return f"Use {' or '.join(f'--dialect {d}' for d in dialects)}, or {keep}"


def build_modelopt_units(source: Source, plan: Plan) -> list[Unit]:
    """The modelopt units: one `BmmJob` unit per quantized transposed 3-D expert tensor (ModelOpt's
    prefixed, transposed form), everything else as `quantgate.exporter.writers.common.build_units` lays it out."""
    return build_bmm_units(source, plan, output_tensors)


def build_bmm_units(source: Source, plan: Plan,
                    outputs: Callable[[str, tuple[int, ...], SchemeSpec], tuple[OutTensor, ...]]) -> list[Unit]:
    """One `BmmJob` unit per quantized transposed 3-D expert tensor, its tensors named by `outputs(tensor,
    stored shape, spec)`; everything else as `quantgate.exporter.writers.common.build_units` lays it out."""
    from quantgate.exporter.writers.common import build_units

    groups = {t: ms for t, ms in bmm_groups(source, plan).items() if plan.assignments[ms[0].name].quantized}
    if not groups:
        return build_units(source, plan)
    taken = {m.name for ms in groups.values() for m in ms}
    rest = dataclasses.replace(plan, assignments={n: a for n, a in plan.assignments.items() if n not in taken})
    units = [u for u in build_units(source, rest) if u.key not in groups]   # drop their BF16 copies
    for tensor, members in groups.items():
        spec = plan.assignments[members[0].name].scheme
        assert spec is not None
        job = BmmJob(tensor, tuple(sorted(members, key=lambda m: m.name)), spec)
        units.append(Unit(tensors=outputs(tensor, tuple(source.info(tensor).shape), spec), job=job))
    units.sort(key=lambda u: u.key)
    return units


def quantize_bmm(job: BmmJob, source: Source, scales: InputScales, device: torch.device,
                 weight: torch.Tensor | None = None, numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    """Quantize `job`'s stored [E, in, out] tensor (see the module docstring); `weight` is the tensor
    already read (`BmmJob.read`), or None to read it expert by expert from `source`."""
    from quantgate.exporter.numerics.nvfp4 import weight_amax
    from quantgate.exporter.schemes.apply import quantize, stored_input_scale
    from quantgate.exporter.source import TORCH_DTYPES

    found = lookup(MODELOPT, job.spec.name)
    if found is None or not found[1].experts_3d or found[0].numerics.scale_from_amax is None:
        raise UnsupportedArchitectureError(f"{job.tensor}: no 3-D expert writer for {job.spec.name}")
    entry, form = found   # (check_bmm_plan refuses the rest before any weight is read)
    num = entry.numerics_for(form)
    cuda = device.type == "cuda"

    def expert(e: int) -> torch.Tensor:   # [in, out]
        if weight is not None:
            return weight[e]
        return source.expert_tensor(job.tensor, e, pin=cuda).to(device, non_blocking=True)

    n_experts = source.info(job.tensor).shape[0]
    if weight is not None:
        amax = weight_amax(weight)                                   # of the whole tensor
    else:
        amax = torch.stack([weight_amax(expert(e)) for e in range(n_experts)]).max()
    # one per-tensor scale for the whole tensor (one ModelOpt quantizer); each expert's [in, out] slab is
    # quantized as its [out, in] matrix and stored transposed back
    scale = num.scale_from_amax(amax, numerics).reshape(())
    if weight is not None:   # the whole [E, in, out] stack in one call, as [E, out, in]
        outs = quantize(num, weight.transpose(-1, -2), scale, numerics)
    else:                    # larger than WHOLE_READ_MAX: streamed, one expert per call
        parts = [quantize(num, expert(e).t(), scale, numerics) for e in range(n_experts)]
        outs = tuple(torch.stack([p[i] for p in parts]) if parts[0][i].ndim else parts[0][i]
                     for i in range(len(num.outputs)))
    result: dict[str, torch.Tensor] = {}
    for name, t in zip(num.outputs, outs):
        stored = scale.clone() if t.ndim <= 1 else t.transpose(-1, -2).contiguous()   # the shared scale: 0-d
        result[output_name(job.tensor, form.suffix(name))] = stored
    if num.input_scale is not None and job.spec.activation_scales:
        amax_in = scales.amax(job.modules[0].name)   # shared by every expert of this projection (InputScales)
        suffix, scale_in = stored_input_scale(entry, form, amax_in, TORCH_DTYPES[source.info(job.tensor).dtype],
                                             (), numerics)
        result[output_name(job.tensor, suffix)] = scale_in
    return result
