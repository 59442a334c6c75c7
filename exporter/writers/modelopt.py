"""The ModelOpt dialect writer: tensors, scale sharing and configs as ModelOpt 0.47 spells them.

Reference: shared/reference/lab_modelopt.md §3 (verbatim configs, tensor names, scale sharing) and
modelopt.md §1-§5. Tensor suffixes, dtypes and shapes come from `validators.schemes` (the table the
validator checks against), never from this file.

Naming: each quantized module is written under its layout name. For fused 3-D experts those are the
virtual per-expert names (`model.layers.0.experts.3.gate_proj`), ModelOpt's unfused spelling; per-
expert sources keep their own names (Mixtral `w1/w2/w3`). Everything not quantized is copied
byte-for-byte under its source name, except a tied `lm_head.weight`.

Scale sharing (what vLLM and SGLang need, modelopt.md §4):
* NVFP4: every fused group (q/k/v, gate/up, one expert's gate/up) shares `weight_scale_2`
  (global scale of the largest weight amax) and `input_scale` (largest input amax).
* FP8: fused groups share `input_scale`; only an expert's gate/up share `weight_scale`.
* The routed experts of one layer share one input scale for gate/up and one for down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.calib_stats import ActivationStats
from exporter.excludes import ExcludeSynthesis, synthesize_excludes
from exporter.recipes import Plan
from exporter.source import Source, slice_fused
from exporter.writers.sharding import OutTensor, Unit
from validators.errors import QuantgateError
from validators.layout import Kind, Module
from validators.schemes import SchemeSpec

log = logging.getLogger(__name__)

PRODUCER_NAME = "quantgate"
#: quant_algos for which ModelOpt 0.47 writes `config_groups.group_0` (modelopt.md §1.2).
CONFIG_GROUP_ALGOS: frozenset[str] = frozenset({"FP8", "NVFP4", "W4A16_NVFP4"})
#: quant_algos the writer can produce (the numerics exist).
WRITABLE_ALGOS: frozenset[str] = frozenset({"FP8", "NVFP4"})
#: Kinds whose fused groups share the weight's per-tensor scale, per scheme (modelopt.md §4).
SHARED_WEIGHT_SCALE_KINDS: dict[str, frozenset[Kind]] = {
    "NVFP4": frozenset({Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT}),
    "FP8": frozenset({Kind.EXPERT}),
}
#: Roles of an expert that read the layer's input (share one input scale); the rest read the
#: activation after gating (down).
EXPERT_INPUT_ROLES: frozenset[str] = frozenset({"gate", "up", "gate_up"})


def producer() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("quantgate")
    except PackageNotFoundError:
        ver = "0.0.0"
    return {"name": PRODUCER_NAME, "version": ver}


# --------------------------------------------------------------------------- configs
def hf_quant_config(spec: SchemeSpec, exclude: Sequence[str]) -> dict:
    """`hf_quant_config.json`, key order as ModelOpt 0.47 writes it (lab_modelopt.md §3)."""
    algo = _algo(spec)
    extra = {"group_size": spec.group_size} if spec.group_size else {}
    return {"producer": producer(),
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, **extra,
                             "exclude_modules": list(exclude)}}


def quantization_config(spec: SchemeSpec, exclude: Sequence[str]) -> dict:
    """config.json `quantization_config` (ModelOpt's `convert_hf_quant_config_format`)."""
    algo = _algo(spec)
    qc: dict = {}
    if algo in CONFIG_GROUP_ALGOS:
        args = {"dynamic": False, "num_bits": spec.weight_bits, "type": "float",
                **({"group_size": spec.group_size} if spec.group_size else {})}
        inputs = {"input_activations": dict(args)} if spec.activation_scales else {}
        qc["config_groups"] = {"group_0": {**inputs, "weights": dict(args), "targets": ["Linear"]}}
    qc.update({"ignore": list(exclude), "quant_algo": algo, "producer": producer(), "quant_method": "modelopt"})
    return qc


def _algo(spec: SchemeSpec) -> str:
    algo = spec.quant_algo
    if algo not in WRITABLE_ALGOS:
        raise QuantgateError(f"the modelopt writer does not write quant_algo {algo!r} (supported: "
                             f"{', '.join(sorted(WRITABLE_ALGOS))})")
    return algo


# --------------------------------------------------------------------------- excludes
def exclude_candidates(source: Source, plan: Plan) -> tuple[list[str], list[str], list[str]]:
    """(excluded Linear-like modules, quantized modules, always-listed names) for the exclude list.

    Only modules with a matrix weight are listed (ModelOpt lists modules that carry a quantizer;
    norms and 1-D parameters never). `lm_head` is always listed: with tied embeddings it has no
    tensor, but vLLM still builds an lm_head and would quantize it under NVFP4.
    """
    excluded, quantized = [], []
    for name, assignment in plan.assignments.items():
        module = source.layout.modules[name]
        if assignment.quantized:
            quantized.append(name)
        elif module.kind is not Kind.NORM and _is_matrix(module):
            excluded.append(name)
    always = [] if any(m.kind is Kind.LM_HEAD for m in source.layout.modules.values()) else ["lm_head"]
    return excluded, quantized, always


def _is_matrix(module: Module) -> bool:
    if module.fused is not None:
        return True
    weight = module.tensors.get("weight")
    return weight is not None and len(weight.shape) >= 2


def build_excludes(source: Source, plan: Plan) -> ExcludeSynthesis:
    excluded, quantized, always = exclude_candidates(source, plan)
    fused = [m.name for m in source.layout.modules.values() if m.fused_group]
    return synthesize_excludes(excluded, quantized, source.architecture, always=always, fused_members=fused)


# --------------------------------------------------------------------------- units
@dataclass(frozen=True)
class CopyJob:
    """Copy one source tensor unchanged."""

    name: str


@dataclass(frozen=True)
class QuantJob:
    """Quantize the modules of one fused group (or one lone module) together."""

    modules: tuple[Module, ...]
    spec: SchemeSpec


def build_units(source: Source, plan: Plan) -> list[Unit]:
    """Every output tensor of the export, grouped into units, in name order."""
    layout = source.layout
    consumed: set[str] = set()
    groups: dict[str, list[Module]] = {}
    for name, assignment in plan.assignments.items():
        if not assignment.quantized:
            continue
        module = layout.modules[name]
        consumed.add(module.fused.tensor if module.fused is not None else module.tensors["weight"].name)
        groups.setdefault(module.fused_group or module.name, []).append(module)
    units: list[Unit] = []
    for members in groups.values():
        spec = plan.assignments[members[0].name].scheme
        members = sorted(members, key=lambda m: m.name)
        tensors = tuple(OutTensor(f"{m.name}.{t.suffix}", t.dtypes[0], tuple(t.shape(m.out_features, m.in_features)))
                        for m in members for t in spec.tensors if t.required)
        units.append(Unit(tensors=tensors, job=QuantJob(tuple(members), spec)))
    dropped = tied_lm_head_tensors(source)
    for name, info in source.view.tensors.items():
        if name in consumed or name in dropped:
            continue
        units.append(Unit(tensors=(OutTensor(name, info.dtype, tuple(info.shape)),), job=CopyJob(name)))
    units.sort(key=lambda u: u.key)
    return units


def tied_lm_head_tensors(source: Source) -> set[str]:
    """lm_head tensors to drop because the config ties them to the embeddings (HF drops them too)."""
    if not source.tied_embeddings:
        return set()
    return {t.name for m in source.layout.by_kind(Kind.LM_HEAD) for t in m.tensors.values()}


# --------------------------------------------------------------------------- input scales
class InputScales:
    """Input amax per quantized module after the sharing rules; a missing amax is an error."""

    def __init__(self, plan: Plan, source: Source, stats: ActivationStats | None) -> None:
        self._amax: dict[str, float] = {}
        quantized = [source.layout.modules[n] for n in plan.quantized()]
        needs = [m for m in quantized if plan.assignments[m.name].scheme.activation_scales]
        if not needs:
            return
        if stats is None:
            raise QuantgateError("the plan needs activation scales but no calibration statistics were given")
        stats.check_covers(m.name for m in needs)
        shared: dict[str, float] = {}
        for module in needs:
            for key in _input_share_keys(module):
                shared[key] = max(shared.get(key, 0.0), stats.input_amax(module.name))
        for module in needs:
            self._amax[module.name] = max(shared[key] for key in _input_share_keys(module))

    def amax(self, module: str) -> float:
        return self._amax[module]


def _input_share_keys(module: Module) -> list[str]:
    """Modules with the same key get one input scale: fused groups, and an MoE layer per input role."""
    keys = [module.fused_group or module.name]
    if module.kind is Kind.EXPERT and module.moe_group:
        keys.append(f"{module.moe_group}::{'in' if module.role in EXPERT_INPUT_ROLES else module.role}")
    return keys


# --------------------------------------------------------------------------- quantizing
Quantizer = Callable[..., tuple[torch.Tensor, ...]]


def _quantizer(spec: SchemeSpec) -> tuple[Quantizer, tuple[str, ...]]:
    """The numerics function for a scheme and the suffixes of what it returns, in order."""
    if spec.quant_algo == "NVFP4":
        from exporter.numerics.nvfp4 import quantize_nvfp4
        return quantize_nvfp4, ("weight", "weight_scale", "weight_scale_2")
    if spec.quant_algo == "FP8":
        from exporter.numerics.fp8 import quantize_fp8
        return quantize_fp8, ("weight", "weight_scale")
    raise QuantgateError(f"no quantizer for scheme {spec.name}")


def _activation_scale(amax: float, spec: SchemeSpec) -> torch.Tensor:
    from exporter.numerics.fp8 import activation_scale

    return activation_scale(torch.tensor(amax, dtype=torch.float32), spec.quant_algo).to(torch.float32).reshape(())


def group_weight_scale(spec: SchemeSpec, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-tensor weight scale a fused group shares: from the largest member amax."""
    if spec.quant_algo == "NVFP4":
        from exporter.numerics.nvfp4 import shared_global_scale
        return shared_global_scale(list(weights))
    from exporter.numerics.fp8 import fp8_scale
    from exporter.numerics.nvfp4 import weight_amax
    return fp8_scale(torch.stack([weight_amax(w) for w in weights]).max())


def read_group(job: QuantJob, source: Source, device: torch.device) -> dict[str, torch.Tensor]:
    """The group's [out, in] weights on `device`.

    One expert's fused gate_up slab is read once for both its gate and up modules. For CUDA the
    bytes are read into pinned memory, copied asynchronously, and sliced on the GPU.
    """
    cuda = device.type == "cuda"
    slabs: dict[tuple[str, int], torch.Tensor] = {}
    weights = {}
    for m in job.modules:
        if m.fused is not None:
            key = (m.fused.tensor, m.fused.expert)
            if key not in slabs:
                slabs[key] = source.expert_tensor(*key, pin=cuda).to(device, non_blocking=True)
            weights[m.name] = slice_fused(slabs[key], m.fused)
        else:
            weights[m.name] = source.tensor(m.tensors["weight"].name, pin=cuda).to(device, non_blocking=True)
    return weights


def quantize_group(job: QuantJob, source: Source, scales: InputScales, device: torch.device,
                   weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Quantize one fused group; members share the per-tensor weight scale where the scheme says so.

    `weights` are the group's weights already read (`read_group`, e.g. by a prefetch thread).
    """
    quantize, suffixes = _quantizer(job.spec)
    weights = dict(weights) if weights is not None else read_group(job, source, device)
    share = job.modules[0].kind in SHARED_WEIGHT_SCALE_KINDS.get(job.spec.quant_algo, frozenset())
    shared_scale = group_weight_scale(job.spec, list(weights.values())) if share and len(weights) > 1 else None
    out: dict[str, torch.Tensor] = {}
    for module in job.modules:
        w = weights.pop(module.name)
        result = quantize(w) if shared_scale is None else quantize(w, shared_scale)
        specs = {t.suffix: t for t in job.spec.tensors}
        for suffix, tensor in zip(suffixes, result):
            planned = tuple(specs[suffix].shape(module.out_features, module.in_features))
            # shared scales are cloned: each module owns its tensor in the file
            out[f"{module.name}.{suffix}"] = tensor.reshape(()).clone() if planned == () else tensor
        if job.spec.activation_scales:
            out[f"{module.name}.input_scale"] = _activation_scale(scales.amax(module.name), job.spec)
    return out


def write_configs(out_dir: Path, source: Source, spec: SchemeSpec, exclude: Sequence[str]) -> None:
    """config.json (source config + quantization_config) and hf_quant_config.json."""
    from exporter.writers.sharding import write_json_atomic

    config = dict(source.config)
    config["quantization_config"] = quantization_config(spec, exclude)
    write_json_atomic(out_dir / "config.json", config, indent=2)
    write_json_atomic(out_dir / "hf_quant_config.json", hf_quant_config(spec, exclude), indent=4)
