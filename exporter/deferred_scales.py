"""Input scales written after the weight pass, so the pass can run while calibration runs.

Weights, block scales and weight global scales depend only on the weights; the activation-derived
tensors (ModelOpt `input_scale`, compressed-tensors `input_global_scale` / FP8 `input_scale`) are
4-byte scalars that depend only on the calibrated input amax. Their bytes have planned offsets (the
shard plan fixes every tensor's offset before anything is read: exporter.writers.sharding), so a
weight pass can run before the amax exists:

1. the writer runs with `PlaceholderInputScales`: every module's amax is `PLACEHOLDER_AMAX`, and
   each module the writer asks about is recorded;
2. for every unit, `DeferredInputScales.produced` takes the placeholder-valued tensors the writer
   produced and checks them against this module's own formula at the same placeholder amax (a
   writer whose input-scale arithmetic changed fails the job loudly instead of writing stale bits);
3. once calibration is done, `patch` computes the real tensors with the same formulas and writes
   them at their planned offsets (`sharding.patch_tensors`: pwrite + fdatasync), before validation
   and before the temporary directory is renamed into place.

The formulas are per dialect (`INPUT_SCALE_TENSORS`); a dialect without an entry is never run
this way (`supports`). The formulas call the writers' own helpers, so they restate only which
helper names which tensor. The byte identity of both orders is tested per dialect and scheme
(tests/exporter/test_overlap.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter.source import Source
from quantgate.exporter.writers.sharding import Shard, Unit, patch_tensors, tensor_bytes
from quantgate.validators.errors import QuantgateError
from quantgate.validators.schemes import COMPRESSED_TENSORS, FP8_NATIVE, MODELOPT

#: The amax every module gets during a deferred weight pass: fp32(pi / 4), a value whose scale is no
#: power of two, so a formula that divides differently from the writer shows in the check of step 2.
PLACEHOLDER_AMAX = float(torch.tensor(0.7853981633974483, dtype=torch.float32))


class PlaceholderInputScales:
    """Stands in for `writers.common.InputScales` during a deferred pass: `amax` of any module is
    `PLACEHOLDER_AMAX`; `asked` records the modules the caller asked about (thread-safe)."""

    def __init__(self) -> None:
        self.asked: set[str] = set()
        self._lock = threading.Lock()

    def amax(self, module: str) -> float:
        with self._lock:
            self.asked.add(module)
        return PLACEHOLDER_AMAX


class DeferredInputScaleError(QuantgateError):
    """A writer's activation-scale tensors and the deferred formulas disagree (a bug: report it)."""


# --------------------------------------------------------------------------- formulas per dialect
AmaxFn = Callable[[str], float]
#: (unit, amax of a module, numerics mode, source) -> the unit's activation-derived tensors' bytes by name
InputTensorsFn = Callable[[Unit, AmaxFn, str, Source], dict[str, bytes]]


@lru_cache(maxsize=4096)
def _modelopt_scale(amax: float, algo: str, numerics: str) -> bytes:
    from quantgate.exporter.numerics.fp8 import activation_scale

    # modelopt._activation_scale and bmm_experts.quantize_bmm: fp32 activation_scale, shape []
    scale = activation_scale(torch.tensor(amax, dtype=torch.float32), algo, numerics)
    return bytes(tensor_bytes(scale.to(torch.float32).reshape(())))


def _modelopt_tensors(unit: Unit, amax: AmaxFn, numerics: str, source: Source) -> dict[str, bytes]:
    from quantgate.exporter.writers.bmm_experts import BmmJob, output_name

    job = unit.job
    spec = getattr(job, "spec", None)
    if spec is None or not spec.activation_scales:
        return {}
    if isinstance(job, BmmJob):   # one input quantizer per 3-D projection, asked as its first module
        return {output_name(job.tensor, "input_scale"): _modelopt_scale(amax(job.modules[0].name),
                                                                        spec.quant_algo, numerics)}
    return {f"{m.name}.input_scale": _modelopt_scale(amax(m.name), spec.quant_algo, numerics) for m in job.modules}


@lru_cache(maxsize=4096)
def _ct_nvfp4(amax: float, numerics: str) -> bytes:
    from quantgate.exporter.numerics.nvfp4 import ct_global_scale, nvfp4_input_scale

    return bytes(tensor_bytes(ct_global_scale(nvfp4_input_scale(torch.tensor(amax, dtype=torch.float32),
                                                                 numerics))))


@lru_cache(maxsize=4096)
def _ct_fp8(amax: float, numerics: str, weight_dtype: torch.dtype) -> bytes:
    from quantgate.exporter.numerics.fp8 import activation_scale
    from quantgate.exporter.writers.compressed_tensors import round_up_to

    scale = activation_scale(torch.tensor(amax), "FP8", numerics)
    return bytes(tensor_bytes(round_up_to(scale, weight_dtype).reshape(1)))


def _ct_tensors(unit: Unit, amax: AmaxFn, numerics: str, source: Source) -> dict[str, bytes]:
    """compressed-tensors: NVFP4 `input_global_scale` (reciprocal of ModelOpt's input scale), FP8
    `input_scale` rounded up to the weight dtype; picked by the tensor names the unit plans."""
    from quantgate.exporter.source import TORCH_DTYPES

    job = unit.job
    spec = getattr(job, "spec", None)
    if spec is None or not spec.activation_scales:
        return {}
    planned = {t.name for t in unit.tensors}
    out: dict[str, bytes] = {}
    for m in job.modules:
        if f"{m.name}.input_global_scale" in planned:
            out[f"{m.name}.input_global_scale"] = _ct_nvfp4(amax(m.name), numerics)
        elif f"{m.name}.input_scale" in planned:
            dtype = TORCH_DTYPES[_weight_info(source, m).dtype]
            out[f"{m.name}.input_scale"] = _ct_fp8(amax(m.name), numerics, dtype)
    return out


def _weight_info(source: Source, module: Any):
    return source.info(module.fused.tensor if module.fused is not None else module.tensors["weight"].name)


#: Dialect -> its activation-derived tensors. FP8_NATIVE writes none (dynamic activation scales).
INPUT_SCALE_TENSORS: dict[str, InputTensorsFn] = {
    MODELOPT: _modelopt_tensors,
    COMPRESSED_TENSORS: _ct_tensors,
    FP8_NATIVE: lambda unit, amax, numerics, source: {},
}


def supports(dialect: str) -> bool:
    """Whether a weight pass of `dialect` can run before calibration (see the module docstring)."""
    return dialect in INPUT_SCALE_TENSORS


# --------------------------------------------------------------------------- one deferred pass
@dataclass
class DeferredInputScales:
    """The bookkeeping of one deferred weight pass: which units carry activation-derived tensors."""

    dialect: str
    source: Source
    numerics: str
    scales: PlaceholderInputScales = field(default_factory=PlaceholderInputScales)
    units: list[Unit] = field(default_factory=list)
    covered: set[str] = field(default_factory=set)   # modules whose amax the formulas use

    def produced(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> None:
        """Check a unit's produced placeholder-valued tensors against the formulas (step 2)."""
        expected = self._tensors(unit, self._recording_amax)
        for name, data in expected.items():
            got = tensors.get(name)
            if got is None or bytes(tensor_bytes(got)) != data:
                raise DeferredInputScaleError(
                    f"{unit.key}: the {self.dialect} writer's {name} is not what the deferred input-scale "
                    f"formula gives for the same amax; run with QUANTGATE_OVERLAP=0 and report this")
        if expected:
            self.units.append(unit)

    def check_complete(self) -> None:
        """Every module the writer asked an amax for has its tensors among those patched later."""
        missing = sorted(self.scales.asked - self.covered)
        if missing:
            raise DeferredInputScaleError(
                f"the {self.dialect} writer derives tensors from the input amax of {missing[:3]} "
                f"({len(missing)} modules) that the deferred patch does not write; run with QUANTGATE_OVERLAP=0 "
                "and report this")

    def patch(self, shards: list[Shard], scales: Any, out_dir: Path) -> int:
        """Write the real activation-derived tensors (from `scales`, an InputScales) at their planned
        offsets; returns how many were written."""
        real: dict[str, bytes] = {}
        for unit in self.units:
            real.update(self._tensors(unit, scales.amax))
        patch_tensors(out_dir, shards, real)
        return len(real)

    def _recording_amax(self, module: str) -> float:
        self.covered.add(module)
        return PLACEHOLDER_AMAX

    def _tensors(self, unit: Unit, amax: AmaxFn) -> dict[str, bytes]:
        return INPUT_SCALE_TENSORS[self.dialect](unit, amax, self.numerics, self.source)
