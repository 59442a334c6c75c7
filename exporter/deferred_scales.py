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

The formula is the scheme registry's `schemes.apply.stored_input_scale`, the one function every
writer computes its stored input scales with (per module; once per 3-D expert tensor), so nothing is
restated here; the check of step 2 still catches a writer that stops using it. The byte identity of both orders is tested per dialect and scheme
(tests/exporter/test_overlap.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter.schemes.core import INPUT_SCALE
from quantgate.exporter.source import Source
from quantgate.exporter.writers.shard_plan import Shard, Unit
from quantgate.exporter.writers.sharding import patch_tensors, tensor_bytes
from quantgate.validators.errors import QuantgateError

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


# --------------------------------------------------------------------------- the formula
AmaxFn = Callable[[str], float]
#: (unit, amax of a module, numerics mode, source) -> the unit's activation-derived tensors' bytes by name
InputTensorsFn = Callable[[Unit, AmaxFn, str, Source], dict[str, bytes]]


def input_scale_tensors(unit: Unit, amax: AmaxFn, numerics: str, source: Source) -> dict[str, bytes]:
    """The unit's activation-derived tensors, as bytes by name, from the scheme registry's
    `stored_input_scale` (the function every writer calls): per module, or once per 3-D expert tensor
    (one input quantizer per projection, asked as its first module). Empty for units without them."""
    return input_scale_bytes([unit], amax, numerics, source)


def input_scale_bytes(units: list[Unit], amax: AmaxFn, numerics: str, source: Source) -> dict[str, bytes]:
    """`input_scale_tensors` of many units, one registry call per scheme, form, weight dtype and shape
    (`stored_input_scales`: element-wise, the same bits as one call per module)."""
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for unit in units:
        for key, name, module in _input_scale_entries(unit, source):
            groups.setdefault(key, []).append((name, amax(module)))
    out: dict[str, bytes] = {}
    for key, members in groups.items():
        stored = _stored_bytes(*key, tuple(a for _, a in members), numerics)
        out.update(zip((name for name, _ in members), stored))
    return out


def _input_scale_entries(unit: Unit, source: Source) -> list[tuple[tuple, str, str]]:
    """(group key, stored tensor name, module whose amax it takes) of each activation-derived tensor."""
    from quantgate.exporter.schemes import lookup
    from quantgate.exporter.source import TORCH_DTYPES
    from quantgate.exporter.writers.bmm_experts import BmmJob, output_name

    job = unit.job
    spec = getattr(job, "spec", None)
    found = lookup(spec.dialect, spec.name) if spec is not None and spec.activation_scales else None
    if found is None or found[0].numerics_for(found[1]).input_scale is None:
        return []
    suffix = found[1].suffix(INPUT_SCALE)
    if isinstance(job, BmmJob):
        dtype = TORCH_DTYPES[source.info(job.tensor).dtype]
        return [((spec.dialect, spec.name, dtype, ()), output_name(job.tensor, suffix), job.modules[0].name)]
    entries = []
    for m in job.modules:
        dtype = TORCH_DTYPES[_weight_info(source, m).dtype]
        shape = tuple(spec.by_suffix[suffix].shape(m.out_features, m.in_features))
        entries.append(((spec.dialect, spec.name, dtype, shape), f"{m.name}.{suffix}", m.name))
    return entries


@functools.lru_cache(maxsize=1024)
def _stored_bytes(dialect: str, spec_name: str, dtype: torch.dtype, shape: tuple[int, ...],
                  amaxes: tuple[float, ...], numerics: str) -> tuple[bytes, ...]:
    """The stored input scales of modules with these amaxes, as bytes each (cached: during a deferred
    pass every module has the placeholder amax, so each unit's check costs a lookup)."""
    from quantgate.exporter.schemes import lookup
    from quantgate.exporter.schemes.apply import stored_input_scales

    scheme, form = lookup(dialect, spec_name)
    _, stored = stored_input_scales(scheme, form, list(amaxes), dtype, shape, numerics)
    return tuple(bytes(tensor_bytes(t)) for t in stored)


def _weight_info(source: Source, module: Any):
    return source.info(module.fused.tensor if module.fused is not None else module.tensors["weight"].name)


def supports(dialect: str) -> bool:
    """Whether a weight pass of `dialect` can run before calibration: every dialect quantgate writes
    computes its input scales through the registry (see the module docstring)."""
    from quantgate.exporter.recipes import WRITABLE_DIALECTS

    return dialect in WRITABLE_DIALECTS


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def produced(self, unit: Unit, tensors: dict[str, Any]) -> None:
        """Check a unit's produced placeholder-valued tensors against the formulas (step 2); called
        by the producing threads."""
        expected = self._tensors(unit, self._recording_amax)
        for name, data in expected.items():
            got = tensors.get(name)
            if got is None or bytes(tensor_bytes(got)) != data:
                raise DeferredInputScaleError(
                    f"{unit.key}: the {self.dialect} writer's {name} is not what the deferred input-scale "
                    f"formula gives for the same amax; run with QUANTGATE_OVERLAP=0 and report this")
        if expected:
            with self._lock:
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
        real = input_scale_bytes(self.units, scales.amax, self.numerics, self.source)
        patch_tensors(out_dir, shards, real)
        return len(real)

    def _recording_amax(self, module: str) -> float:
        with self._lock:
            self.covered.add(module)
        return PLACEHOLDER_AMAX

    def _tensors(self, unit: Unit, amax: AmaxFn) -> dict[str, bytes]:
        return input_scale_tensors(unit, amax, self.numerics, self.source)
