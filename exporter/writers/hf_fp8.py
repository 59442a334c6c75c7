"""The Hugging Face native `fp8` dialect writer: 128x128 block FP8 as DeepSeek-V3 / Qwen3-*-FP8 ship it.

Reference: shared/reference/formats_beyond_two.md §2 (vLLM `quantization/fp8.py::Fp8Config`, SGLang
`layers/quantization/fp8.py`) and transformers' `FineGrainedFP8Config` / `Fp8Quantize`, the producer
our numerics (`quantgate.exporter.numerics.fp8_block`) match bit for bit.

What is written:
* config.json gains `quantization_config` = {"activation_scheme": "dynamic", "fmt": "e4m3",
  "quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": [...]} (no
  hf_quant_config.json). `fmt` is what the official releases carry; the engines ignore it.
* Each quantized Linear (per expert for MoE) gets `weight` F8_E4M3 [out, in] and `weight_scale_inv`
  F32 [out/128, in/128] under its layout name (fused 3-D sources: the unfused
  `experts.{e}.gate_proj` names vLLM's `make_expert_params_mapping` reads). No activation scales:
  the engines quantize activations per token group at run time.
* `modules_to_not_convert` lists the exact name of every Linear-like module left BF16 (routers,
  lm_head, vision towers, ragged modules ...), in the Hugging Face name space and in each engine's
  (`compressed_tensors.ignore_list`, the same enumeration): the engines match fp8 exclusions exactly
  per shard (vLLM) or on dot boundaries (SGLang >= 0.5.11), never by wildcard, and vLLM skips a
  FusedMoE whose prefix is inside an entry naming experts (validators/fp8_engines.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter.jsonfile import write_json_atomic
from quantgate.exporter.recipes import Plan
from quantgate.exporter.schemes import writable_form
from quantgate.exporter.schemes.apply import quantize_members
from quantgate.exporter.source import Source
from quantgate.exporter.writers.common import InputScales, QuantJob, build_units, read_group
from quantgate.exporter.writers.compressed_tensors import ignore_list
from quantgate.exporter.writers.shard_plan import Unit
from quantgate.validators.schemes import FP8_NATIVE, SchemeSpec

log = logging.getLogger(__name__)

QUANT_METHOD = "fp8"
ACTIVATION_SCHEME = "dynamic"      # the only scheme the engines build for weight blocks
FP8_FORMAT = "e4m3"                # `fmt` as the DeepSeek-V3 release spells it (read by no engine)

def _writable(spec: SchemeSpec | None) -> SchemeSpec:
    """The plan's spec when the registry has a writable native fp8 form for it (recipe fp8_block)."""
    writable_form(FP8_NATIVE, spec, "native fp8")
    assert spec is not None and spec.weight_block is not None
    return spec


def quantization_config(spec: SchemeSpec, not_convert: list[str]) -> dict[str, Any]:
    """config.json `quantization_config`, keys as the Qwen3-*-FP8 releases order them."""
    b0, b1 = _writable(spec).weight_block
    return {"activation_scheme": ACTIVATION_SCHEME, "fmt": FP8_FORMAT, "quant_method": QUANT_METHOD,
            "weight_block_size": [b0, b1], "modules_to_not_convert": list(not_convert)}


def build_fp8_units(source: Source, plan: Plan) -> list[Unit]:
    """The scheme table's tensors (`weight` F8_E4M3, `weight_scale_inv` F32) per quantized module."""
    return build_units(source, plan)


def quantize_group(job: QuantJob, source: Source, scales: InputScales, device: torch.device,
                   weights: dict[str, torch.Tensor] | None = None,
                   numerics: str | None = None) -> dict[str, torch.Tensor]:
    """Quantize each module of one group independently (block scales are never shared).

    `numerics` (ModelOpt's CPU/CUDA rounding modes) does not apply: the reference producer of this
    format is transformers' Fp8Quantize, which `quantgate.exporter.numerics.fp8_block` reproduces."""
    entry, form = writable_form(FP8_NATIVE, job.spec, "native fp8")
    weights = dict(weights) if weights is not None else read_group(job, source, device)
    return quantize_members(entry, form, job.modules, weights)


def prepare_configs(source: Source, plan: Plan) -> Callable[[Path], None]:
    """Build the config now (an unsupported plan fails before any weight is read); write it later."""
    qc = quantization_config(plan.scheme, ignore_list(source, plan))

    def write(out_dir: Path) -> None:
        config = dict(source.config)
        config["quantization_config"] = qc
        write_json_atomic(out_dir / "config.json", config, indent=2)
    return write


__all__ = ["build_fp8_units", "prepare_configs", "quantization_config", "quantize_group"]
