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

import copy
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter.jsonfile import write_json_atomic
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.recipes import Plan
from quantgate.exporter.schemes import Form, Scheme, ct_args, writable_form
from quantgate.exporter.schemes.apply import quantize_members, round_up_to
from quantgate.exporter.source import Source
from quantgate.exporter.writers.common import (
    InputScales,
    QuantJob,
    build_units,
    exclude_candidates,
    read_group,
)
from quantgate.exporter.writers.shard_plan import OutTensor, Unit
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
# --------------------------------------------------------------------------- config
def quantization_args(**overrides: Any) -> dict[str, Any]:
    """A `QuantizationArgs` dump as compressed-tensors 0.19/0.20 writes it (every field, sorted keys)."""
    try:
        return ct_args(**overrides)
    except ValueError as exc:   # compressed-tensors validates with extra="forbid"
        raise QuantgateError(str(exc)) from None


def _entry(spec: SchemeSpec) -> tuple[Scheme, Form]:
    return writable_form(COMPRESSED_TENSORS, spec)


def config_group(spec: SchemeSpec, targets: Sequence[str]) -> dict[str, Any]:
    """One `config_groups` entry (a QuantizationScheme dump) with its own `format`: the registry's
    `weights` / `input_activations` args (`quantgate.exporter.schemes`)."""
    config = _entry(spec)[1].config
    return {"format": spec.ct_format, "input_activations": copy.deepcopy(config["input_activations"]),
            "output_activations": None, "targets": list(targets), "weights": copy.deepcopy(config["weights"])}


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


# --------------------------------------------------------------------------- quantizing
def quantize_group(job: QuantJob, source: Source, scales: InputScales, device: torch.device,
                   weights: dict[str, torch.Tensor] | None = None,
                   numerics: str = DEFAULT_NUMERICS) -> dict[str, torch.Tensor]:
    """Quantize one fused group (or lone module) into its compressed-tensors tensors (the registry
    entry's form: renames, reciprocal global scales, scales in the weight dtype).

    `numerics` (exporter.numerics.modes) rounds the NVFP4/FP8 scales the way ModelOpt does on CUDA
    (default) or on the CPU; the int schemes do not depend on it."""
    entry, form = _entry(job.spec)
    weights = dict(weights) if weights is not None else read_group(job, source, device)
    return quantize_members(entry, form, job.modules, weights, scales.amax, numerics)


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


__all__ = ["CT_VERSION", "ENGINE_MOE_PROBES", "build_ct_units",
           "config_group", "ignore_list", "plan_groups", "prepare_configs", "quantization_args",
           "quantization_config", "quantize_group", "round_up_to"]
