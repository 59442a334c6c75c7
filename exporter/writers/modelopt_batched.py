"""Many ModelOpt NVFP4 groups quantized in one batched pass (the GPU weight pass).

`modelopt.quantize_group` quantizes one fused group (one expert's gate/up, or its down) with about
fifty small kernels and a few host synchronisations. On a GPU those launches and syncs, not the
arithmetic, bound the weight pass (a 2048x1024 expert matrix quantizes in microseconds). Here the
weights of many consecutive groups (e.g. one MoE layer's experts) are stacked by shape and
quantized together: the same element-wise operations as `quantgate.exporter.numerics.nvfp4`, applied to
`[B, out, in]` with one global scale per matrix, so the bytes are identical to `quantize_group`'s
(tests/exporter/test_modelopt_batched.py checks every tensor), with one host sync per batch for the
finite check and the fused-group scale sharing, and one asynchronous device-to-host copy into
page-locked memory per output kind and shape.

Policy (which groups share `weight_scale_2`, input scales) is `modelopt.py`'s, reused, not restated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import ACCEL_CHUNK_ELEMS, CPU_CHUNK_ELEMS, NumericsError, check_weight
from quantgate.exporter.numerics.e2m1 import e2m1_encode, pack_nibbles
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS, scalar_div
from quantgate.exporter.numerics.nvfp4 import BLOCK, GLOBAL_AMAX_DIVISOR, nvfp4_block_scale, nvfp4_input_scale
from quantgate.exporter.source import Source
from quantgate.exporter.writers.common import InputScales, QuantJob, read_group
from quantgate.exporter.schemes import lookup
from quantgate.exporter.schemes.apply import shares_scale
from quantgate.validators.schemes import MODELOPT
from quantgate.exporter.writers.sharding import Unit

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
                   device: torch.device, numerics: str = DEFAULT_NUMERICS) -> list[dict[str, Tensor]]:
    """Each unit's output tensors (on the CPU), byte-identical to `modelopt.quantize_group`."""
    jobs: list[QuantJob] = [u.job for u in units]
    names: list[str] = []            # one entry per module, in job order
    weights: list[Tensor] = []
    for job in jobs:
        group = read_group(job, source, device)
        for m in job.modules:
            check_weight(group[m.name], what=f"NVFP4 {m.name}", in_divisor=BLOCK)
            names.append(m.name)
            weights.append(group[m.name])
    by_shape: dict[tuple[int, int, torch.dtype], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault((w.shape[0], w.shape[1], w.dtype), []).append(i)

    # 1. per-matrix amax (one stacked reduction per shape), then one host sync for all of them
    stacks = {key: torch.stack([weights[i] for i in idx]) for key, idx in by_shape.items()}
    del weights
    amax = torch.empty(len(names), dtype=torch.float32, device=device)
    for key, idx in by_shape.items():
        amax[torch.tensor(idx, device=device)] = _matrix_amax(stacks[key])
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
    ws2 = _global_scales(scale_amax, numerics)                                        # fp32 [M]

    # 3. quantize each shape's stack in chunks; one device-to-host copy per output kind and shape
    packed: dict[int, Tensor] = {}
    block: dict[int, Tensor] = {}
    for key, idx in by_shape.items():
        p, b = _quantize_stack(stacks.pop(key), ws2[torch.tensor(idx, device=device)])
        p, b = _to_host(p), _to_host(b)
        for j, i in enumerate(idx):
            packed[i], block[i] = p[j], b[j]
    host_ws2 = _to_host(ws2)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()   # the copies above are asynchronous

    out: list[dict[str, Tensor]] = []
    k = 0
    for job in jobs:
        tensors: dict[str, Tensor] = {}
        for m in job.modules:
            tensors[f"{m.name}.weight"] = packed[k]
            tensors[f"{m.name}.weight_scale"] = block[k]
            tensors[f"{m.name}.weight_scale_2"] = host_ws2[k].reshape(()).clone()
            if job.spec.activation_scales:
                amax_in = torch.tensor(scales.amax(m.name), dtype=torch.float32)
                tensors[f"{m.name}.input_scale"] = nvfp4_input_scale(amax_in, numerics).reshape(()).clone()
            k += 1
        out.append(tensors)
    return out


def _to_host(t: Tensor) -> Tensor:
    """A host copy of `t`; from a GPU into page-locked memory, asynchronously (a pageable copy is
    staged by the driver at a few GB/s and blocks; the caller synchronises the stream once)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _chunk(stack: Tensor) -> int:
    """Matrices per chunk so that a chunk's fp32 temporaries stay about one numerics chunk."""
    budget = CPU_CHUNK_ELEMS if stack.device.type == "cpu" else ACCEL_CHUNK_ELEMS
    return max(1, budget // max(1, stack[0].numel()))


def _matrix_amax(stack: Tensor) -> Tensor:
    """max |w| per matrix. [B, out, in] -> fp32 [B] (in the weight dtype first, as `abs_max`)."""
    step = _chunk(stack)
    return torch.cat([stack[s:s + step].abs().amax(dim=(1, 2)) for s in range(0, stack.shape[0], step)]).float()


def _global_scales(amax: Tensor, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """`nvfp4_global_scale` per entry: amax / 2688 as `numerics` divides, 0 -> 1.0. fp32 [M] -> [M]."""
    amax = torch.where(amax == 0, torch.full_like(amax, GLOBAL_AMAX_DIVISOR), amax)
    return scalar_div(amax, GLOBAL_AMAX_DIVISOR, numerics)


def _quantize_stack(stack: Tensor, ws2: Tensor) -> tuple[Tensor, Tensor]:
    """NVFP4 of B matrices, each with its own global scale. [B,out,in], fp32 [B] ->
    (uint8 [B, out, in/2], float8_e4m3fn [B, out, in/16]); `quantize_nvfp4` op for op."""
    b, out_f, in_f = stack.shape
    packed = torch.empty((b, out_f, in_f // 2), dtype=torch.uint8, device=stack.device)
    scales = torch.empty((b, out_f, in_f // BLOCK), dtype=torch.float8_e4m3fn, device=stack.device)
    step = _chunk(stack)
    for s in range(0, b, step):
        blocks = stack[s:s + step].reshape(-1, out_f, in_f // BLOCK, BLOCK)   # [c, out, in/16, 16]
        g = ws2[s:s + step].reshape(-1, 1, 1)                                  # fp32 [c, 1, 1]
        block_amax = blocks.abs().amax(dim=-1).float()                         # [c, out, in/16]
        scale = nvfp4_block_scale(block_amax, g)                               # e4m3 [c, out, in/16]
        divisor = scale.float() * g                                            # fp32 [c, out, in/16]
        codes = e2m1_encode(blocks / divisor.unsqueeze(-1))                    # uint8 [c, out, in/16, 16]
        packed[s:s + step] = pack_nibbles(codes.reshape(-1, out_f, in_f))
        scales[s:s + step] = scale
    return packed, scales



#: Devices whose weight pass batches (on a CPU, per-unit parallelism over cores is faster).
BATCH_DEVICES: frozenset[str] = frozenset({"cuda"})
BATCH_DIALECTS: frozenset[str] = frozenset({"modelopt"})
MAX_BATCH_OUTPUT_BYTES = 64 * 2**20       # ~230 MiB of BF16 read: NVFP4 output is ~0.28x its source


def feed_batching(dialect: str, device: torch.device, units: Sequence[Unit], source: Source,
                  scales: InputScales, numerics: str = DEFAULT_NUMERICS) -> dict[str, Any]:
    """`UnitFeed` keyword arguments that batch this weight pass, or {} where it should not."""
    if device.type not in BATCH_DEVICES or dialect not in BATCH_DIALECTS:
        return {}
    from quantgate.exporter.unit_feed import device_stream

    def work_batch(members: list[Unit]) -> list[dict[str, Tensor]]:
        with device_stream(device):
            return quantize_batch(members, source, scales, device, numerics)

    batches = plan_batches(units, [u.nbytes for u in units], max_bytes=MAX_BATCH_OUTPUT_BYTES)
    log.info("weight pass: %d units in %d batches on %s", len(units), len(batches), device)
    return {"batches": batches, "work_batch": work_batch}
