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
from collections.abc import Sequence
from pathlib import Path

import torch

from quantgate.exporter.excludes import ExcludeSynthesis, synthesize_excludes
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.recipes import Plan
from quantgate.exporter.schemes import writable_form
from quantgate.exporter.schemes.apply import quantize_members
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
from quantgate.validators.schemes import MODELOPT, SchemeSpec

log = logging.getLogger(__name__)

PRODUCER_NAME = "quantgate"


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
    if writable_form(MODELOPT, spec)[1].config.get("config_group"):
        args = group_args(spec)
        inputs = {"input_activations": dict(args)} if spec.activation_scales else {}
        qc["config_groups"] = {"group_0": {**inputs, "weights": dict(args), "targets": ["Linear"]}}
    qc.update({"ignore": list(exclude), "quant_algo": algo, "producer": producer(), "quant_method": "modelopt"})
    return qc


def group_args(spec: SchemeSpec) -> dict:
    """The QuantizationArgs-like dict ModelOpt 0.47 writes in `config_groups` (modelopt.md §1.2)."""
    return {"dynamic": False, "num_bits": spec.weight_bits, "type": "float",
            **({"group_size": spec.group_size} if spec.group_size else {})}


def _algo(spec: SchemeSpec) -> str:
    writable_form(MODELOPT, spec)
    assert spec.quant_algo is not None
    return spec.quant_algo


# --------------------------------------------------------------------------- excludes
def build_excludes(source: Source, plan: Plan) -> ExcludeSynthesis:
    excluded, quantized, always = exclude_candidates(source, plan)
    fused = [m.name for m in source.layout.modules.values() if m.fused_group]
    return synthesize_excludes(excluded, quantized, source.architecture, always=always, fused_members=fused)


# --------------------------------------------------------------------------- quantizing
def quantize_group(job: QuantJob, source: Source, scales: InputScales, device: torch.device,
                   weights: dict[str, torch.Tensor] | None = None,
                   numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    """Quantize one fused group; members share the per-tensor weight scale where the scheme says so
    (`quantgate.exporter.schemes`, `Scheme.shared_scale_kinds`).

    `weights` are the group's weights already read (`read_group`, e.g. by a prefetch thread);
    `numerics` says whose bits to reproduce (exporter.numerics.modes).
    """
    entry, form = writable_form(MODELOPT, job.spec)
    weights = dict(weights) if weights is not None else read_group(job, source, device)
    return quantize_members(entry, form, job.modules, weights, scales.amax, numerics)


def write_configs(out_dir: Path, source: Source, spec: SchemeSpec, exclude: Sequence[str]) -> None:
    """config.json (source config + quantization_config) and hf_quant_config.json."""
    from quantgate.exporter.jsonfile import write_json_atomic

    config = dict(source.config)
    config["quantization_config"] = quantization_config(spec, exclude)
    write_json_atomic(out_dir / "config.json", config, indent=2)
    write_json_atomic(out_dir / "hf_quant_config.json", hf_quant_config(spec, exclude), indent=4)
