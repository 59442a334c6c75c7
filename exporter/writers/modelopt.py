"""The ModelOpt dialect writer: tensors, scale sharing and configs as ModelOpt 0.47 spells them.

Reference: shared/reference/lab_modelopt.md §3 (verbatim configs, tensor names, scale sharing) and
modelopt.md §1-§5. Tensor suffixes, dtypes and shapes come from `quantgate.validators.schemes` (the table the
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
from pathlib import Path

import torch

from quantgate.exporter.excludes import ExcludeSynthesis, synthesize_excludes
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.recipes import Plan
from quantgate.exporter.source import Source
from quantgate.exporter.writers.common import (  # noqa: F401 - shared pieces, re-exported for callers
    EXPERT_INPUT_ROLES,
    CopyJob,
    InputScales,
    QuantJob,
    build_units,
    exclude_candidates,
    read_group,
    tied_lm_head_tensors,
)
from quantgate.validators.errors import QuantgateError
from quantgate.validators.layout import Kind
from quantgate.validators.schemes import SchemeSpec

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
def build_excludes(source: Source, plan: Plan) -> ExcludeSynthesis:
    excluded, quantized, always = exclude_candidates(source, plan)
    fused = [m.name for m in source.layout.modules.values() if m.fused_group]
    return synthesize_excludes(excluded, quantized, source.architecture, always=always, fused_members=fused)


# --------------------------------------------------------------------------- quantizing
Quantizer = Callable[..., tuple[torch.Tensor, ...]]


def _quantizer(spec: SchemeSpec) -> tuple[Quantizer, tuple[str, ...]]:
    """The numerics function for a scheme and the suffixes of what it returns, in order."""
    if spec.quant_algo == "NVFP4":
        from quantgate.exporter.numerics.nvfp4 import quantize_nvfp4
        return quantize_nvfp4, ("weight", "weight_scale", "weight_scale_2")
    if spec.quant_algo == "FP8":
        from quantgate.exporter.numerics.fp8 import quantize_fp8
        return quantize_fp8, ("weight", "weight_scale")
    raise QuantgateError(f"no quantizer for scheme {spec.name}")


def _activation_scale(amax: float, spec: SchemeSpec, numerics: str = DEFAULT_NUMERICS) -> torch.Tensor:
    from quantgate.exporter.numerics.fp8 import activation_scale

    scale = activation_scale(torch.tensor(amax, dtype=torch.float32), spec.quant_algo, numerics)
    return scale.to(torch.float32).reshape(())


def group_weight_scale(spec: SchemeSpec, weights: Sequence[torch.Tensor],
                       numerics: str = DEFAULT_NUMERICS) -> torch.Tensor:
    """The per-tensor weight scale a fused group shares: from the largest member amax."""
    if spec.quant_algo == "NVFP4":
        from quantgate.exporter.numerics.nvfp4 import shared_global_scale
        return shared_global_scale(list(weights), numerics)
    from quantgate.exporter.numerics.fp8 import fp8_scale
    from quantgate.exporter.numerics.nvfp4 import weight_amax
    return fp8_scale(torch.stack([weight_amax(w) for w in weights]).max(), numerics)


def quantize_group(job: QuantJob, source: Source, scales: InputScales, device: torch.device,
                   weights: dict[str, torch.Tensor] | None = None,
                   numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    """Quantize one fused group; members share the per-tensor weight scale where the scheme says so.

    `weights` are the group's weights already read (`read_group`, e.g. by a prefetch thread);
    `numerics` says whose bits to reproduce (exporter.numerics.modes).
    """
    quantize, suffixes = _quantizer(job.spec)
    weights = dict(weights) if weights is not None else read_group(job, source, device)
    share = job.modules[0].kind in SHARED_WEIGHT_SCALE_KINDS.get(job.spec.quant_algo, frozenset())
    shared_scale = (group_weight_scale(job.spec, list(weights.values()), numerics)
                    if share and len(weights) > 1 else None)
    out: dict[str, torch.Tensor] = {}
    for module in job.modules:
        w = weights.pop(module.name)
        result = quantize(w, shared_scale, numerics=numerics)
        specs = {t.suffix: t for t in job.spec.tensors}
        for suffix, tensor in zip(suffixes, result):
            planned = tuple(specs[suffix].shape(module.out_features, module.in_features))
            # shared scales are cloned: each module owns its tensor in the file
            out[f"{module.name}.{suffix}"] = tensor.reshape(()).clone() if planned == () else tensor
        if job.spec.activation_scales:
            out[f"{module.name}.input_scale"] = _activation_scale(scales.amax(module.name), job.spec, numerics)
    return out


def write_configs(out_dir: Path, source: Source, spec: SchemeSpec, exclude: Sequence[str]) -> None:
    """config.json (source config + quantization_config) and hf_quant_config.json."""
    from quantgate.exporter.jsonfile import write_json_atomic

    config = dict(source.config)
    config["quantization_config"] = quantization_config(spec, exclude)
    write_json_atomic(out_dir / "config.json", config, indent=2)
    write_json_atomic(out_dir / "hf_quant_config.json", hf_quant_config(spec, exclude), indent=4)
