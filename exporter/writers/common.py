"""Pieces every dialect writer shares: the output units, exclusion candidates, input-scale sharing, reads.

A writer (`exporter/writers/modelopt.py`, `exporter/writers/compressed_tensors.py`) turns a `Plan` into
units (`build_units`: one per fused group of quantized modules, one per pass-through tensor), reads a
group's weights (`read_group`), quantizes them its own way, and writes its own config files. The
streaming shard loop in `quantgate.exporter.pipeline` drives any `DialectWriter`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter.calibration.stats import ActivationStats
from quantgate.exporter.recipes import Plan
from quantgate.exporter.device_reads import DeviceReader
from quantgate.exporter.source import Source, slice_fused
from quantgate.exporter.writers.shard_plan import OutTensor, Unit
from quantgate.validators.errors import QuantgateError
from quantgate.validators.layout import Kind, Module
from quantgate.validators.schemes import SchemeSpec

log = logging.getLogger(__name__)

#: Roles of an expert that read the layer's input (share one input scale); the rest read the
#: activation after gating (down).
EXPERT_INPUT_ROLES: frozenset[str] = frozenset({"gate", "up", "gate_up"})

OutTensorsFn = Callable[[Module, SchemeSpec], tuple[OutTensor, ...]]


def table_tensors(module: Module, spec: SchemeSpec) -> tuple[OutTensor, ...]:
    """The scheme table's required tensors of `module`, each in the table's first (write) dtype."""
    return tuple(OutTensor(f"{module.name}.{t.suffix}", t.dtypes[0], tuple(t.shape(module.out_features,
                                                                                   module.in_features)))
                 for t in spec.tensors if t.required)


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


def build_units(source: Source, plan: Plan, out_tensors: OutTensorsFn | None = None) -> list[Unit]:
    """Every output tensor of the export, grouped into units, in name order.

    `out_tensors(module, spec)` names a quantized module's tensors (default: the scheme table's
    required tensors in their first dtype).
    """
    out_tensors = out_tensors or table_tensors
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
        tensors = tuple(t for m in members for t in out_tensors(m, spec))
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


def _slab(module: Module) -> tuple[str, int | None]:
    """The source tensor a module's weight is read from, with its expert for a fused 3-D tensor."""
    if module.fused is not None:
        return module.fused.tensor, module.fused.expert
    return module.tensors["weight"].name, None


def _group_weights(job: QuantJob, slabs: dict[tuple[str, int | None], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's [out, in] weight from the slabs read (a fused slab sliced per module)."""
    return {m.name: slice_fused(slabs[_slab(m)], m.fused) if m.fused is not None else slabs[_slab(m)]
            for m in job.modules}


def read_group(job: QuantJob, source: Source, device: torch.device) -> dict[str, torch.Tensor]:
    """The group's [out, in] weights on `device`, each slab read once (one expert's fused gate_up
    serves its gate and its up). For CUDA the bytes go through pinned memory and are copied
    asynchronously; the weight pass reads through `read_groups` and a `DeviceReader` instead."""
    cuda = device.type == "cuda"
    slabs = {}
    for name, expert in dict.fromkeys(_slab(m) for m in job.modules):
        data = source.tensor(name, pin=cuda) if expert is None else source.expert_tensor(name, expert, pin=cuda)
        slabs[(name, expert)] = data.to(device, non_blocking=True)
    return _group_weights(job, slabs)


#: Bytes of adjacent source spans read as one (one device copy, one page-locking) by `read_groups`.
MAX_COALESCED = 512 * 2**20


def read_groups(jobs: Sequence[QuantJob], source: Source, reader: DeviceReader) -> list[dict[str, torch.Tensor]]:
    """`read_group` of each job, on `reader`'s device, with the source spans of all the jobs read
    together: adjacent spans (one MoE layer's experts lie one after another in their fused tensor)
    are coalesced up to `MAX_COALESCED` bytes into one `reader.read`."""
    wanted = {key: source.span(*key) for key in dict.fromkeys(_slab(m) for job in jobs for m in job.modules)}
    runs: list[list[tuple[str, int | None]]] = []
    for key in sorted(wanted, key=lambda k: wanted[k][:2]):
        path, offset, length = wanted[key]
        if runs:
            head, tail = wanted[runs[-1][0]], wanted[runs[-1][-1]]
            if tail[0] == path and tail[1] + tail[2] == offset and offset + length - head[1] <= MAX_COALESCED:
                runs[-1].append(key)
                continue
        runs.append([key])
    slabs: dict[tuple[str, int | None], torch.Tensor] = {}
    for run in runs:
        path, start, _ = wanted[run[0]]
        _, last, last_length = wanted[run[-1]]
        data = reader.read(path, start, last + last_length - start)
        for name, expert in run:
            _, offset, length = wanted[(name, expert)]
            shape = source.info(name).shape
            slabs[(name, expert)] = data[offset - start:offset - start + length].view(source.torch_dtype(name)) \
                .reshape(shape[1:] if expert is not None else shape)
    return [_group_weights(job, slabs) for job in jobs]


@dataclass(frozen=True)
class DialectWriter:
    """What the streaming weight pass needs from one dialect.

    * `build_units(source, plan)`: every output tensor, grouped (see `build_units`);
    * `quantize_group(job, source, scales, device, weights)`: a QuantJob's output tensors;
    * `prepare_configs(source, plan)`: computed before any weight is read (fails fast), returns the
      function that writes the dialect's config files into the output directory at the end.
    """

    dialect: str
    build_units: Callable[[Source, Plan], list[Unit]]
    quantize_group: Callable[..., dict[str, torch.Tensor]]
    prepare_configs: Callable[[Source, Plan], Callable[[Path], None]]

    def input_scales(self, plan: Plan, source: Source, stats: ActivationStats | None) -> InputScales:
        return InputScales(plan, source, stats)

    def read(self, unit: Unit, source: Source, device: torch.device, reader: DeviceReader | None = None) -> Any:
        """The data a unit needs: a pass-through tensor, or a group's weights on `device` (through
        `reader` where given, as the weight pass does: on CUDA, no host copy)."""
        job = unit.job
        if isinstance(job, CopyJob):
            return source.tensor(job.name)
        if not isinstance(job, QuantJob):   # e.g. a whole 3-D tensor (exporter.writers.bmm_experts.BmmJob)
            return job.read(source, device)
        if reader is not None:
            return read_groups([job], source, reader)[0]
        return read_group(job, source, device)
