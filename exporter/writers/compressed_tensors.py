"""The compressed-tensors dialect writer: tensors and `quantization_config` as llm-compressor writes them.

Reference: shared/reference/lab_llmc_vllm.md Part 1 (verbatim configs and tensor layout of
llm-compressor 0.14 / compressed-tensors 0.19) and llmcompressor_and_services.md §A1-§A3. Tensor
suffixes, dtypes and shapes come from `quantgate.validators.schemes` (the table the validator checks against).

What is written:
* config.json gains `quantization_config` (no hf_quant_config.json in this dialect): one config
  group per scheme the plan uses, `targets: ["Linear"]` for the most used one and exact module names
  for the others; per-group and top-level `format` (`mixed-precision` when the groups differ);
  `ignore` lists the exact name of every Linear-like module left BF16 (routers, lm_head, vision
  towers ...), as llm-compressor's save does and as vLLM's `should_ignore_layer` expects;
  `quantization_status: compressed`, `version` of the compressed-tensors release our numerics match.
* Quantized modules are written per module under their layout names: per-expert sources keep their
  own names (Mixtral `block_sparse_moe.experts.{e}.w1`, which vLLM, SGLang and transformers all map;
  llm-compressor's `gate_proj` spelling there loads silently wrong in transformers), fused 3-D sources
  get the unfused `experts.{e}.gate_proj` names vLLM's compressed-tensors MoE loader reads.
* Scales follow the weight dtype where the table allows it (compressed-tensors: "scales use the
  module's weight dtype"); NVFP4 global scales are float32 reciprocals of ModelOpt's
  (`weight_global_scale = 2688 / amax`), shared by fused groups (q/k/v, gate/up, an expert's gate/up).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter.jsonfile import write_json_atomic
from quantgate.exporter.numerics.fp8 import activation_scale, fp8_scale, quantize_fp8
from quantgate.exporter.numerics.int4 import quantize_w4a16
from quantgate.exporter.numerics.int8 import quantize_w8a8_int8
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.numerics.nvfp4 import (
    ct_global_scale,
    nvfp4_input_scale,
    quantize_nvfp4,
    shared_global_scale,
    weight_amax,
)
from quantgate.exporter.recipes import Plan
from quantgate.exporter.source import Source
from quantgate.exporter.writers.common import (
    InputScales,
    QuantJob,
    build_units,
    exclude_candidates,
    read_group,
)
from quantgate.exporter.writers.sharding import OutTensor, Unit
from quantgate.validators.engines import ENGINE_SEMANTICS
from quantgate.validators.errors import QuantgateError
from quantgate.validators.layout import Kind, Module
from quantgate.validators.schemes import COMPRESSED_TENSORS, SchemeSpec

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
#: The compressed-tensors release whose quantization math `quantgate.exporter.numerics` reproduces bit for bit.
CT_VERSION = "0.20.0"
MIXED_FORMAT = "mixed-precision"
LINEAR_TARGET = "Linear"
FP8_SCALE_DTYPE_NAME = "torch.float8_e4m3fn"

#: Schemes this writer produces (names in validators.schemes for the compressed-tensors dialect).
WRITABLE_SCHEMES: frozenset[str] = frozenset({"W4A16", "W8A8", "NVFP4A16", "NVFP4", "FP8"})
#: Kinds whose fused groups share the per-tensor weight scale, per scheme: vLLM fuses q/k/v and
#: gate/up into one parameter with one NVFP4 global scale (it warns and picks one when they differ);
#: its FP8 MoE keeps one w13 scale per expert. Group-wise int schemes have nothing to share.
SHARED_WEIGHT_SCALE_KINDS: dict[str, frozenset[Kind]] = {
    "NVFP4": frozenset({Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT}),
    "NVFP4A16": frozenset({Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT}),
    "FP8": frozenset({Kind.EXPERT}),
}


# --------------------------------------------------------------------------- config
def quantization_args(**overrides: Any) -> dict[str, Any]:
    """A `QuantizationArgs` dump as compressed-tensors 0.19/0.20 writes it (every field, sorted keys)."""
    args: dict[str, Any] = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
                            "num_bits": 8, "observer": "memoryless_minmax", "observer_kwargs": {},
                            "scale_dtype": None, "strategy": "tensor", "symmetric": True, "type": "int",
                            "zp_dtype": None}
    unknown = set(overrides) - set(args)
    if unknown:   # compressed-tensors validates with extra="forbid"
        raise QuantgateError(f"not QuantizationArgs fields: {sorted(unknown)}")
    args.update(overrides)
    return dict(sorted(args.items()))


def _nvfp4_args(spec: SchemeSpec, **overrides: Any) -> dict[str, Any]:
    return quantization_args(type="float", num_bits=spec.weight_bits, group_size=spec.group_size,
                             strategy="tensor_group", scale_dtype=FP8_SCALE_DTYPE_NAME, **overrides)


#: scheme name -> (weights args, input_activations args or None), the llm-compressor presets
#: (compressed-tensors `PRESET_SCHEMES`), with bit widths and group sizes from the scheme table.
SCHEME_ARGS: dict[str, Callable[[SchemeSpec], tuple[dict, dict | None]]] = {
    "W4A16": lambda s: (quantization_args(num_bits=s.weight_bits, group_size=s.group_size, strategy="group"), None),
    "W8A8": lambda s: (quantization_args(num_bits=s.weight_bits, strategy="channel"),
                       quantization_args(num_bits=8, dynamic=True, observer=None, strategy="token")),
    "NVFP4A16": lambda s: (_nvfp4_args(s), None),
    "NVFP4": lambda s: (_nvfp4_args(s), _nvfp4_args(s, dynamic="local", observer="static_minmax")),
    "FP8": lambda s: (quantization_args(type="float", num_bits=s.weight_bits),
                      quantization_args(type="float", num_bits=8, observer="static_minmax")),
}


def _writable(spec: SchemeSpec) -> SchemeSpec:
    if spec.dialect != COMPRESSED_TENSORS or spec.name not in WRITABLE_SCHEMES:
        raise QuantgateError(f"the compressed-tensors writer does not write scheme {spec.key} (supported: "
                             f"{', '.join(sorted(WRITABLE_SCHEMES))})")
    return spec


def config_group(spec: SchemeSpec, targets: Sequence[str]) -> dict[str, Any]:
    """One `config_groups` entry (a QuantizationScheme dump) with its own `format`."""
    weights, inputs = SCHEME_ARGS[_writable(spec).name](spec)
    return {"format": spec.ct_format, "input_activations": inputs, "output_activations": None,
            "targets": list(targets), "weights": weights}


def quantization_config(groups: Sequence[tuple[SchemeSpec, Sequence[str]]], ignore: Sequence[str]) -> dict:
    """config.json `quantization_config` for (scheme, targets) groups, keys as compressed-tensors sorts them."""
    if not groups:
        raise QuantgateError("a compressed-tensors config needs at least one quantized scheme")
    formats = {spec.ct_format for spec, _ in groups}
    return {
        "config_groups": {f"group_{i}": config_group(spec, targets) for i, (spec, targets) in enumerate(groups)},
        "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def plan_groups(plan: Plan) -> list[tuple[SchemeSpec, list[str]]]:
    """(scheme, targets) per scheme: the most used targets `Linear`, the others their exact module names.

    vLLM (and compressed-tensors' `match_targets`) prefers an exact name over a class target, so a
    module listed by name in a later group is not claimed by the `Linear` group.
    """
    members: dict[str, list[str]] = {}
    specs: dict[str, SchemeSpec] = {}
    for name, assignment in plan.assignments.items():
        if assignment.scheme is not None:
            members.setdefault(assignment.scheme.name, []).append(name)
            specs[assignment.scheme.name] = assignment.scheme
    order = [name for name, _ in Counter({k: len(v) for k, v in members.items()}).most_common()]
    return [(specs[name], [LINEAR_TARGET] if i == 0 else sorted(members[name], key=natural_key))
            for i, name in enumerate(order)]


def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`, and `lm_head` last (module order)."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)
    return (name.split(".")[0] == "lm_head", parts)


#: The projections vLLM's compressed-tensors MoE method resolves for a FusedMoE layer, on expert 0
#: under the engine's names (`compressed_tensors_moe.get_moe_method`: `<moe prefix>.0.gate_proj`,
#: `.0.up_proj`, `.0.down_proj`; reference vllm_sglang.md §5), whatever the checkpoint calls them.
ENGINE_MOE_PROBES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def ignore_list(source: Source, plan: Plan) -> list[str]:
    """Exact names of the Linear-like modules left BF16 (not embeddings), in module order: their
    Hugging Face names, plus the names the engines resolve them by where those differ.

    compressed-tensors' save enumerates every unquantized module of a class it quantized
    somewhere (the Hugging Face names, which transformers' own loader matches). vLLM maps `ignore`
    through the model's hf_to_vllm_mapper prefixes only, never through renames inside the model's
    weight iterator (Gemma4 `experts` -> `moe.experts`), and resolves a MoE layer through expert 0's
    `ENGINE_MOE_PROBES` under its engine prefix (Mixtral's `w1/w2/w3` are never consulted). So every
    BF16 module is also listed under its engine name (`quantgate.validators.engines`, the name space the
    ModelOpt writer's `exclude_modules` are proven in) and every BF16 MoE layer by its probes.
    """
    excluded, _, always = exclude_candidates(source, plan)
    modules = source.layout.modules
    names = [n for n in excluded if modules[n].kind is not Kind.EMBEDDING] + always
    arch = source.architecture
    engine_names = []
    for sem in ENGINE_SEMANTICS.values():
        for name in names:
            module = modules.get(name)
            if module is not None and module.kind is Kind.EXPERT and module.moe_group:
                moe = sem.engine_name(module.moe_group, arch)
                engine_names += [f"{moe}.0.{proj}" for proj in ENGINE_MOE_PROBES]
            else:
                engine_names.append(sem.engine_name(name, arch))
    return sorted(dict.fromkeys(names + engine_names), key=natural_key)


# --------------------------------------------------------------------------- tensors
def _weight_dtype(source: Source, module: Module) -> str:
    info = source.info(module.fused.tensor) if module.fused is not None else module.tensors["weight"]
    return info.dtype


def out_tensors_for(source: Source) -> Callable[[Module, SchemeSpec], tuple[OutTensor, ...]]:
    """Each required tensor of the scheme; a scale takes the weight's dtype where the table allows it."""
    def out_tensors(module: Module, spec: SchemeSpec) -> tuple[OutTensor, ...]:
        wdtype = _weight_dtype(source, module)
        return tuple(OutTensor(f"{module.name}.{t.suffix}", wdtype if wdtype in t.dtypes else t.dtypes[0],
                               tuple(t.shape(module.out_features, module.in_features)))
                     for t in spec.tensors if t.required)
    return out_tensors


def build_ct_units(source: Source, plan: Plan) -> list[Unit]:
    return build_units(source, plan, out_tensors_for(source))


def round_up_to(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` (fp32) cast to `dtype`, one ulp up where the cast rounded down: a scale stored in BF16
    must still cover amax / qmax, else the largest weights would clip."""
    cast = value.to(dtype)
    up = torch.nextafter(cast, torch.full_like(cast, float("inf")))
    return torch.where(cast.float() < value, up, cast)


# --------------------------------------------------------------------------- quantizing
def _shared(job: QuantJob) -> bool:
    kinds = SHARED_WEIGHT_SCALE_KINDS.get(job.spec.name, frozenset())
    return len(job.modules) > 1 and job.modules[0].kind in kinds


def _w4a16(job: QuantJob, weights: dict[str, torch.Tensor], scales: InputScales) -> dict[str, torch.Tensor]:
    out = {}
    for m in job.modules:
        packed, scale, shape = quantize_w4a16(weights[m.name], group_size=job.spec.group_size)
        out.update({f"{m.name}.weight_packed": packed, f"{m.name}.weight_scale": scale,
                    f"{m.name}.weight_shape": shape})
    return out


def _w8a8(job: QuantJob, weights: dict[str, torch.Tensor], scales: InputScales) -> dict[str, torch.Tensor]:
    out = {}
    for m in job.modules:
        q, scale = quantize_w8a8_int8(weights[m.name])
        out.update({f"{m.name}.weight": q, f"{m.name}.weight_scale": scale})
    return out


def _nvfp4(job: QuantJob, weights: dict[str, torch.Tensor], scales: InputScales,
           numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    shared = shared_global_scale(list(weights.values()), numerics) if _shared(job) else None
    out = {}
    for m in job.modules:
        packed, block, weight_scale_2 = quantize_nvfp4(weights[m.name], shared, numerics)
        out.update({f"{m.name}.weight_packed": packed, f"{m.name}.weight_scale": block,
                    f"{m.name}.weight_global_scale": ct_global_scale(weight_scale_2)})     # f32 [1]
        if job.spec.activation_scales:
            amax = torch.tensor(scales.amax(m.name), dtype=torch.float32)
            out[f"{m.name}.input_global_scale"] = ct_global_scale(nvfp4_input_scale(amax, numerics))
    return out


def _fp8(job: QuantJob, weights: dict[str, torch.Tensor], scales: InputScales,
         numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    """Per-tensor FP8 with scales in the weight dtype: the stored (rounded-up) scale is the one used."""
    amax = {name: weight_amax(w) for name, w in weights.items()}
    group_amax = torch.stack(list(amax.values())).max() if _shared(job) else None
    out = {}
    for m in job.modules:
        w = weights[m.name]
        scale = round_up_to(fp8_scale(amax[m.name] if group_amax is None else group_amax, numerics), w.dtype)
        q, _ = quantize_fp8(w, scale.float(), numerics)
        out.update({f"{m.name}.weight": q, f"{m.name}.weight_scale": scale.reshape(1)})
        input_scale = activation_scale(torch.tensor(scales.amax(m.name)), "FP8", numerics)
        out[f"{m.name}.input_scale"] = round_up_to(input_scale, w.dtype).reshape(1)
    return out


QUANTIZERS: dict[str, Callable[[QuantJob, dict[str, torch.Tensor], InputScales], dict[str, torch.Tensor]]] = {
    "W4A16": _w4a16, "W8A8": _w8a8, "NVFP4A16": _nvfp4, "NVFP4": _nvfp4, "FP8": _fp8,
}
#: The quantizers whose scales depend on the numerics mode (they take it as a fourth argument).
NUMERICS_AWARE: frozenset[Callable] = frozenset({_nvfp4, _fp8})


def quantize_group(job: QuantJob, source: Source, scales: InputScales, device: torch.device,
                   weights: dict[str, torch.Tensor] | None = None,
                   numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    """Quantize one fused group (or lone module) into its compressed-tensors tensors.

    `numerics` (exporter.numerics.modes) rounds the NVFP4/FP8 scales the way ModelOpt does on CUDA
    (default) or on the CPU; the int schemes do not depend on it."""
    quantize = QUANTIZERS.get(_writable(job.spec).name)
    if quantize is None:
        raise QuantgateError(f"no compressed-tensors quantizer for scheme {job.spec.name}")
    weights = dict(weights) if weights is not None else read_group(job, source, device)
    if quantize in NUMERICS_AWARE:
        return quantize(job, weights, scales, numerics)
    return quantize(job, weights, scales)


# --------------------------------------------------------------------------- files
def prepare_configs(source: Source, plan: Plan) -> Callable[[Path], None]:
    """Build the config now (unsupported schemes fail before any weight is read); write it later."""
    groups = plan_groups(plan)
    qc = quantization_config(groups, ignore_list(source, plan))

    def write(out_dir: Path) -> None:
        config = dict(source.config)
        config["quantization_config"] = qc
        write_json_atomic(out_dir / "config.json", config, indent=2)
    return write


__all__ = ["CT_VERSION", "ENGINE_MOE_PROBES", "SCHEME_ARGS", "WRITABLE_SCHEMES", "build_ct_units",
           "config_group", "ignore_list", "plan_groups", "prepare_configs", "quantization_args",
           "quantization_config", "quantize_group", "round_up_to"]
