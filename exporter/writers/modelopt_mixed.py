"""ModelOpt configs for a plan that quantizes modules with more than one scheme (MIXED_PRECISION).

ModelOpt (`get_quant_config` / `convert_hf_quant_config_format`, reference modelopt.md §1) writes a
plan whose layers use several formats as:

* `hf_quant_config.json`: `quantization.quant_algo = "MIXED_PRECISION"` and `quantized_layers`
  `{module: {"quant_algo": "NVFP4", "group_size": 16} | {"quant_algo": "FP8"}}`;
* config.json `quantization_config` (the flat form vLLM reads first): `quant_method "modelopt"`,
  `quant_algo "MIXED_PRECISION"`, one compressed-tensors style `config_groups.group_i` per distinct
  layer config whose `targets` are the sorted module names, and `quantized_layers` copied verbatim.

Every quantized module is listed under its own (export) name: vLLM's `_resolve_quant_algo` finds a
Linear by exact name, a fused qkv / gate_up layer through its shards (which therefore share one
algo: the plan's groups guarantee it), and a MoE layer through any key below its prefix. Modules
not listed are built unquantized; they are BF16 on disk.

One deliberate addition: ModelOpt leaves `exclude_modules` out (and `ignore` empty) for mixed
plans. We also write the BF16 modules' exclude patterns (the same engine-proven synthesis as for a
uniform plan). vLLM and SGLang apply exclusion before the `quantized_layers` lookup, so both say
the same thing, and readers that only know exclude lists (and our validator's coverage rules)
still see every BF16 module excluded.

A plan with a single scheme is written in the uniform form (`modelopt.write_configs`), as ModelOpt
does when there is exactly one distinct layer config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantgate.exporter.recipes import Plan
from quantgate.exporter.schemes import writable_algos
from quantgate.exporter.writers.modelopt import group_args, producer, write_configs
from quantgate.validators.errors import QuantgateError
from quantgate.validators.schemes import (
    MIXED_PRECISION,
    MIXED_PRECISION_ALGOS,
    SchemeSpec,
    scheme_for_quant_algo,
)


def mixed_writable_algos() -> frozenset[str]:
    """quant_algos a MIXED_PRECISION export can carry: vLLM's accepted per-layer algos we write."""
    return frozenset(MIXED_PRECISION_ALGOS) & writable_algos()


def plan_schemes(plan: Plan) -> dict[str, SchemeSpec]:
    """scheme name -> spec of every scheme the plan uses."""
    return {a.scheme.name: a.scheme for a in plan.assignments.values() if a.scheme is not None}


def is_mixed(plan: Plan) -> bool:
    """True when the plan quantizes with more than one scheme."""
    return len(plan_schemes(plan)) > 1


def layer_config(spec: SchemeSpec) -> dict[str, Any]:
    """The `quantized_layers` entry of one module: quant_algo, plus group_size for block formats."""
    allowed = mixed_writable_algos()
    if spec.quant_algo not in allowed:
        raise QuantgateError(f"a MIXED_PRECISION export cannot hold scheme {spec.name} (quant_algo "
                             f"{spec.quant_algo}); supported: {', '.join(sorted(allowed))}")
    entry: dict[str, Any] = {"quant_algo": spec.quant_algo}
    if spec.group_size and spec.quant_algo != "FP8":
        entry["group_size"] = spec.group_size
    return entry


def quantized_layers(plan: Plan) -> dict[str, dict[str, Any]]:
    """module -> its layer config, for every quantized module of the plan, sorted by name."""
    return {name: layer_config(a.scheme) for name, a in sorted(plan.assignments.items()) if a.scheme is not None}


def group_config(layer: dict[str, Any]) -> dict[str, Any]:
    """ModelOpt's `_quant_algo_to_group_config` for the algos we write (config.json config_groups)."""
    algo = layer["quant_algo"]
    spec = scheme_for_quant_algo(algo)
    if spec is None or algo not in mixed_writable_algos():
        raise QuantgateError(f"no config group for quant_algo {algo!r}")
    args = group_args(spec)
    return {"input_activations": dict(args), "weights": dict(args)}


def config_groups(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One `group_i` per distinct layer config (first-seen order), targets = its sorted modules."""
    by_config: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        by_config.setdefault(tuple(sorted(layer.items())), []).append(name)
    groups: dict[str, dict[str, Any]] = {}
    for i, (key, names) in enumerate(by_config.items()):
        groups[f"group_{i}"] = {**group_config(dict(key)), "targets": sorted(names)}
    return groups


def mixed_hf_quant_config(plan: Plan, exclude: Sequence[str]) -> dict[str, Any]:
    """`hf_quant_config.json` of a mixed plan (nested form)."""
    return {"producer": producer(),
            "quantization": {"quant_algo": MIXED_PRECISION, "kv_cache_quant_algo": None,
                             "quantized_layers": quantized_layers(plan), "exclude_modules": list(exclude)}}


def mixed_quantization_config(plan: Plan, exclude: Sequence[str]) -> dict[str, Any]:
    """config.json `quantization_config` of a mixed plan (flat form, key order as ModelOpt's)."""
    layers = quantized_layers(plan)
    return {"config_groups": config_groups(layers), "quantized_layers": layers, "ignore": list(exclude),
            "quant_algo": MIXED_PRECISION, "producer": producer(), "quant_method": "modelopt"}


def write_quant_configs(out_dir: Path, source: Any, plan: Plan, exclude: Sequence[str]) -> None:
    """config.json + hf_quant_config.json: the uniform form for one scheme, MIXED_PRECISION otherwise."""
    schemes = plan_schemes(plan)
    if not schemes:
        raise QuantgateError(f"recipe {plan.recipe} quantizes no module; there is no quantization config to write")
    if len(schemes) == 1:
        write_configs(out_dir, source, next(iter(schemes.values())), exclude)
        return
    from quantgate.exporter.jsonfile import write_json_atomic

    config = dict(source.config)
    config["quantization_config"] = mixed_quantization_config(plan, exclude)
    write_json_atomic(out_dir / "config.json", config, indent=2)
    write_json_atomic(out_dir / "hf_quant_config.json", mixed_hf_quant_config(plan, exclude), indent=4)
