"""Many ModelOpt NVFP4 groups quantized in one batched pass (the GPU weight pass).

`modelopt.quantize_group` quantizes one fused group (one expert's gate/up, or its down) with about
fifty small kernels and a few host synchronisations. On a GPU those launches and syncs, not the
arithmetic, bound the weight pass (a 2048x1024 expert matrix quantizes in microseconds). Here the
weights of many consecutive groups (e.g. one MoE layer's experts) are stacked by shape and
quantized together: `quantgate.exporter.numerics.nvfp4.quantize_nvfp4` itself, called on `[B, out, in]`
with one global scale per matrix, so the bytes are identical to `quantize_group`'s
(tests/exporter/test_modelopt_batched.py checks every tensor), with one host sync per batch for the
finite check and the fused-group scale sharing, and one asynchronous device-to-host copy into
page-locked memory per output kind and shape.

Policy (which groups share `weight_scale_2`, input scales) is the scheme registry's
(`quantgate.exporter.schemes`), reused, not restated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from quantgate.exporter.numerics.common import NumericsError, check_weight
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.numerics.nvfp4 import (
    BLOCK,
    matrix_amax,
    nvfp4_global_scales,
    quantize_nvfp4,
)
from quantgate.exporter.schemes import lookup
from quantgate.exporter.schemes.apply import shares_scale, stored_input_scales
from quantgate.exporter.source import Source
from quantgate.exporter.device_reads import DeviceReader
from quantgate.exporter.writers.common import InputScales, QuantJob, read_group, read_groups
from quantgate.exporter.writers.shard_plan import Unit
from quantgate.exporter.writers.sharding import HostBytes
from quantgate.validators.schemes import MODELOPT
from torch import Tensor

log = logging.getLogger(__name__)

#: The scheme this pass batches (its numerics take stacks of matrices with one global scale each).
BATCH_SCHEME = "NVFP4"
MAX_BATCH_UNITS = 256


def batchable(unit: Unit) -> bool:
    """A quantized group this module can do (NVFP4, floating weights with in % 16 == 0)."""
    job = unit.job
    return isinstance(job, QuantJob) and job.spec.dialect == MODELOPT and job.spec.name == BATCH_SCHEME and all(
        m.in_features is not None and m.in_features % BLOCK == 0 for m in job.modules)


def plan_batches(units: Sequence[Unit], sizes: Sequence[int], *,
                 max_bytes: int, max_units: int = MAX_BATCH_UNITS) -> list[list[int]]:
    """Consecutive batchable units grouped into batches of at most `max_bytes` (by `sizes`) and
    `max_units` (indices into `units`); every other unit alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, unit in enumerate(units):
        if not batchable(unit):
            if current:
                batches.append(current)
                current, size = [], 0
            batches.append([i])
            continue
        if current and (size + sizes[i] > max_bytes or len(current) >= max_units):
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += sizes[i]
    if current:
        batches.append(current)
    return batches


def quantize_batch(units: Sequence[Unit], source: Source, scales: InputScales,
                   device: torch.device, numerics: str = DEFAULT_NUMERICS,
                   reader: DeviceReader | None = None) -> list[dict[str, Tensor]]:
    """Each unit's output tensors as host bytes (`HostBytes`), byte-identical to `modelopt.quantize_group`.
    With `reader` the batch's source spans are read together, without a host copy where the device
    can (exporter.device_reads)."""
    jobs: list[QuantJob] = [u.job for u in units]
    names: list[str] = []            # one entry per module, in job order
    weights: list[Tensor] = []
    groups = read_groups(jobs, source, reader) if reader is not None else [read_group(j, source, device) for j in jobs]
    for job, group in zip(jobs, groups):
        for m in job.modules:
            check_weight(group[m.name], what=f"NVFP4 {m.name}", in_divisor=BLOCK)
            names.append(m.name)
            weights.append(group[m.name])
    weight_dtypes = [w.dtype for w in weights]
    by_shape: dict[tuple[int, int, torch.dtype], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault((w.shape[0], w.shape[1], w.dtype), []).append(i)

    # 1. per-matrix amax (one stacked reduction per shape), then one host sync for all of them
    stacks = {key: torch.stack([weights[i] for i in idx]) for key, idx in by_shape.items()}
    del weights
    amax = torch.empty(len(names), dtype=torch.float32, device=device)
    for key, idx in by_shape.items():
        amax[torch.tensor(idx, device=device)] = matrix_amax(stacks[key])
    host_amax = amax.cpu().tolist()
    bad = [names[i] for i, a in enumerate(host_amax) if not math.isfinite(a)]
    if bad:
        raise NumericsError(f"NVFP4: the weight contains NaN or Inf values ({bad[:3]}); fix the source "
                            "checkpoint or exclude these modules")

    # 2. the per-tensor scale each matrix is quantized with: its own amax, or its fused group's max
    group_amax: list[float] = []
    k = 0
    for job in jobs:
        n = len(job.modules)
        share = shares_scale(lookup(MODELOPT, job.spec.name)[0], job.modules[0].kind, n)
        members = host_amax[k:k + n]
        group_amax.extend([max(members)] * n if share else members)
        k += n
    scale_amax = torch.tensor(group_amax, dtype=torch.float32).to(device)
    ws2 = nvfp4_global_scales(scale_amax, numerics)                                   # fp32 [M]

    # 3. quantize each shape's stack; one device-to-host copy per output kind and shape, whose host
    #    arrays every module's outputs are views of (no torch call per output tensor)
    packed: list[Any] = [None] * len(names)
    block: list[Any] = [None] * len(names)
    for key, idx in by_shape.items():
        p, b, _ = quantize_nvfp4(stacks.pop(key), ws2[torch.tensor(idx, device=device)], numerics)
        p_host, b_host = _to_host(p).numpy(), _to_host(b).view(torch.uint8).numpy()   # [n, out, in/2], [n, out, in/16]
        for j, i in enumerate(idx):
            packed[i], block[i] = p_host[j], b_host[j]
    ws2_host = _to_host(ws2).numpy()                                                    # fp32 [M]
    inputs = _input_scales(jobs, weight_dtypes, scales, numerics)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()   # the copies above are asynchronous

    out: list[dict[str, HostBytes]] = []
    k = 0
    for job in jobs:
        tensors: dict[str, HostBytes] = {}
        for m in job.modules:
            tensors[f"{m.name}.weight"] = HostBytes.of(packed[k], "U8")
            tensors[f"{m.name}.weight_scale"] = HostBytes.of(block[k], "F8_E4M3")
            tensors[f"{m.name}.weight_scale_2"] = HostBytes.of(ws2_host[k:k + 1].reshape(()), "F32")
            if k in inputs:
                suffix, stored = inputs[k]
                tensors[f"{m.name}.{suffix}"] = stored
            k += 1
        out.append(tensors)
    return out


def _input_scales(jobs: Sequence[QuantJob], weight_dtypes: Sequence[torch.dtype], scales: InputScales,
                  numerics: str) -> dict[int, tuple[str, HostBytes]]:
    """Module index -> (suffix, stored input scale) for the jobs with static input scales, one
    registry call per scheme and weight dtype (`stored_input_scales`: the same bits per module)."""
    groups: dict[tuple[str, torch.dtype], list[tuple[int, str]]] = {}
    k = 0
    for job in jobs:
        for m in job.modules:
            if job.spec.activation_scales:
                groups.setdefault((job.spec.name, weight_dtypes[k]), []).append((k, m.name))
            k += 1
    found: dict[int, tuple[str, HostBytes]] = {}
    for (spec_name, dtype), members in groups.items():
        entry, form = lookup(MODELOPT, spec_name)
        suffix, stored = stored_input_scales(entry, form, [scales.amax(name) for _, name in members], dtype, (),
                                             numerics)
        host = stored.numpy()                                                         # fp32 [n]
        for j, (i, _) in enumerate(members):
            found[i] = (suffix, HostBytes.of(host[j:j + 1].reshape(()), "F32"))
    return found


def _to_host(t: Tensor) -> Tensor:
    """A host copy of `t`; from a GPU into page-locked memory, asynchronously (a pageable copy is
    staged by the driver at a few GB/s and blocks; the caller synchronises the stream once)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


#: Devices whose weight pass batches (on a CPU, per-unit parallelism over cores is faster).
BATCH_DEVICES: frozenset[str] = frozenset({"cuda"})
BATCH_DIALECTS: frozenset[str] = frozenset({"modelopt"})
MAX_BATCH_OUTPUT_BYTES = 64 * 2**20       # ~230 MiB of BF16 read: NVFP4 output is ~0.28x its source


def feed_batching(dialect: str, device: torch.device, units: Sequence[Unit], source: Source,
                  scales: InputScales, numerics: str = DEFAULT_NUMERICS,
                  reader: DeviceReader | None = None) -> dict[str, Any]:
    """`UnitFeed` keyword arguments that batch this weight pass, or {} where it should not; `reader`
    reads each batch's source spans (exporter.device_reads)."""
    if device.type not in BATCH_DEVICES or dialect not in BATCH_DIALECTS:
        return {}
    from quantgate.exporter.unit_feed import device_stream

    def work_batch(members: list[Unit]) -> list[dict[str, Tensor]]:
        with device_stream(device):
            return quantize_batch(members, source, scales, device, numerics, reader)

    batches = plan_batches(units, [u.nbytes for u in units], max_bytes=MAX_BATCH_OUTPUT_BYTES)
    log.info("weight pass: %d units in %d batches on %s", len(units), len(batches), device)
    return {"batches": batches, "work_batch": work_batch}
