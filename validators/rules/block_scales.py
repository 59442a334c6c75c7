"""QG540, QG541: block / group scale tensors (deep; reads only scale tensors, never weights).

Covers the scales the per-tensor reader (`_values.scale_table`) leaves alone: E8M0 exponent bytes
(GPT-OSS mxfp4 `*_scales`, compressed-tensors mxfp4/mxfp8 and ModelOpt MXFP8 `weight_scale`; byte 255
is NaN in the OCP MX spec) and GPTQ/AWQ F16 group `scales`. Each tensor is read in bounded chunks;
at most `MAX_SCAN_BYTES` per validation, the rest is reported as not scanned.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, INFO, LOADS_WRONG, WARNING, finding
from quantgate.validators.schemes import AWQ, GPTQ

if TYPE_CHECKING:
    from quantgate.validators.safetensors_header import TensorInfo

log = logging.getLogger(__name__)

E8M0, FLOAT = "e8m0", "float"
E8M0_NAN = b"\xff"
#: per dtype: (numpy bit view, exponent mask = non-finite, magnitude mask = zero test)
FLOAT_BITS: dict[str, tuple[str, int, int]] = {
    "F16": ("<u2", 0x7C00, 0x7FFF), "BF16": ("<u2", 0x7F80, 0x7FFF), "F32": ("<u4", 0x7F800000, 0x7FFFFFFF)}
MAX_SCAN_BYTES = 512 << 20       # per validation (GPT-OSS-120B holds ~2.4 GB of E8M0 scales)
CHUNK = 8 << 20
MAX_GAP = 64 << 10   # neighbouring scale tensors closer than this are read with one pread


@dataclass
class ScanResult:
    nonfinite: dict[str, int] = field(default_factory=dict)    # tensor -> count of NaN/Inf entries
    zero: dict[str, tuple[int, int]] = field(default_factory=dict)   # tensor -> (zeros, total), float only
    unscanned: list[str] = field(default_factory=list)


def _encoding(spec, suffix: str) -> str | None:
    """E8M0 bytes for U8 block scales; float for GPTQ/AWQ group scales; None otherwise."""
    tspec = spec.by_suffix.get(suffix)
    if tspec is None or suffix == spec.weight_suffix:
        return None
    if tspec.dtypes == ("U8",):
        return E8M0
    if spec.dialect in (GPTQ, AWQ) and suffix == "scales":
        return FLOAT
    return None


def _targets(ctx: Context) -> dict[str, tuple["TensorInfo", str]]:
    out: dict[str, tuple[TensorInfo, str]] = {}
    for cls in ctx.a.quantized_classes:
        spec = cls.state.scheme
        if spec is None:
            continue
        for suffix in cls.rep.tensors:
            enc = _encoding(spec, suffix)
            if enc is None:
                continue
            for m in cls.members:
                info = m.tensors[suffix]
                out.setdefault(info.name, (info, enc))    # fused experts share one tensor
    return out


def scan(ctx: Context) -> ScanResult:
    """Scan every block/group scale tensor once per validation (cached on the analysis)."""
    cached = ctx.a.__dict__.get("_mx_group_scan")
    if cached is not None:
        return cached
    result = ScanResult()
    root, headers = getattr(ctx.view, "root", None), getattr(ctx.view, "headers", None)
    targets = sorted(_targets(ctx).values(), key=lambda t: (t[0].file, t[0].start))
    budget = MAX_SCAN_BYTES
    fds: dict[str, int] = {}
    try:
        runs: list[list[tuple[TensorInfo, str]]] = []
        for info, enc in targets:
            header = headers.get(info.file) if headers else None
            if root is None or header is None or info.nbytes > budget:
                result.unscanned.append(info.name)
                continue
            budget -= info.nbytes
            last = runs[-1][-1][0] if runs else None
            if last is not None and last.file == info.file and 0 <= info.start - last.end <= MAX_GAP \
                    and info.end - runs[-1][0][0].start <= CHUNK:
                runs[-1].append((info, enc))
            else:
                runs.append([(info, enc)])
        for run in runs:
            file = run[0][0].file
            if file not in fds:
                fds[file] = os.open(root / file, os.O_RDONLY)
            base = headers[file].data_offset
            if len(run) == 1:
                _scan_one(fds[file], base, *run[0], result)
            else:
                _scan_run(fds[file], base, run, result)
    except OSError as exc:
        log.debug("block-scale scan stopped: %s", exc)
    finally:
        for fd in fds.values():
            os.close(fd)
    ctx.a.__dict__["_mx_group_scan"] = result
    return result


def _scan_run(fd: int, base: int, run: list[tuple["TensorInfo", str]], result: ScanResult) -> None:
    """Neighbouring small scale tensors: one pread, C-level counts per tensor."""
    lo = run[0][0].start
    raw = os.pread(fd, run[-1][0].end - lo, base + lo)
    floats: dict[str, list[tuple[TensorInfo, int, int]]] = defaultdict(list)
    for info, enc in run:
        a, b = info.start - lo, info.end - lo
        if b > len(raw):
            break                           # truncated file: QG602 reports it
        if enc == E8M0:
            bad = raw.count(E8M0_NAN, a, b)
            if bad:
                result.nonfinite[info.name] = bad
        elif b > a:
            floats[info.dtype].append((info, a, b))
    if not floats:
        return
    import numpy as np   # only for float group scales

    buf = np.frombuffer(raw, dtype=np.uint8)
    for dtype, items in floats.items():
        view, exp_mask, mag_mask = FLOAT_BITS.get(dtype, FLOAT_BITS["F16"])
        width = np.dtype(view).itemsize
        bits = np.concatenate([buf[a:b] for _, a, b in items]).view(view)
        starts = np.cumsum([0] + [(b - a) // width for _, a, b in items[:-1]])
        bad = np.add.reduceat(((bits & exp_mask) == exp_mask).astype(np.int64), starts)
        zeros = np.add.reduceat(((bits & mag_mask) == 0).astype(np.int64), starts)
        for (info, _, _), n_bad, n_zero in zip(items, bad.tolist(), zeros.tolist()):
            if n_bad:
                result.nonfinite[info.name] = n_bad
            if n_zero:
                result.zero[info.name] = (n_zero, info.numel)


def _scan_one(fd: int, base: int, info: "TensorInfo", enc: str, result: ScanResult) -> None:
    bad = zeros = 0
    pos, end = base + info.start, base + info.end
    if enc == FLOAT:
        import numpy as np   # only for float group scales

        view, exp_mask, mag_mask = FLOAT_BITS.get(info.dtype, FLOAT_BITS["F16"])
        width = np.dtype(view).itemsize
    while pos < end:
        raw = os.pread(fd, min(CHUNK, end - pos), pos)
        if not raw:
            break
        pos += len(raw)
        if enc == E8M0:
            bad += raw.count(E8M0_NAN)
        else:
            bits = np.frombuffer(raw[:len(raw) - len(raw) % width], dtype=view)
            bad += int(np.count_nonzero((bits & exp_mask) == exp_mask))
            zeros += int(np.count_nonzero((bits & mag_mask) == 0))
    if bad:
        result.nonfinite[info.name] = bad
    if enc == FLOAT and zeros:
        result.zero[info.name] = (zeros, info.numel)


@rule("QG540", "non-finite-block-scales", ERROR, per_engine=False, deep=True)
def non_finite_block_scales(ctx: Context) -> Iterator[Finding]:
    """A block or group scale tensor holds NaN/Inf: E8M0 byte 255 (MXFP4/MXFP8 `scales` / `weight_scale`)
    or a non-finite F16 GPTQ/AWQ `scales` entry.

    Why: invariant 18. The kernels multiply every weight of the block/group by its scale; vLLM and
    SGLang load the bytes as they are (no check), so the expert or Linear outputs NaN for every token
    routed through it (Model-Optimizer PR #1354 / GPTQModel #1680: uncalibrated experts).

    Fix: re-quantize the listed modules (calibrate every expert); never write exponent 255.
    """
    result = scan(ctx)
    if result.nonfinite:
        names = sorted(result.nonfinite)
        total = sum(result.nonfinite.values())
        yield finding("QG540", ERROR, f"{len(names)} block/group scale tensor(s) hold {total} NaN/Inf entries "
                      "(E8M0 255 or non-finite floats)", modules=names, fix="Re-quantize those modules.",
                      effect=LOADS_WRONG, error="silent: NaN outputs for every token routed through them",
                      counts=result.nonfinite)
    if result.unscanned:
        yield finding("QG540", INFO, f"{len(result.unscanned)} scale tensor(s) were not scanned (over the "
                      f"{MAX_SCAN_BYTES >> 20} MiB budget, or remote)", modules=result.unscanned,
                      fix="Validate a local copy to scan every scale.")


@rule("QG541", "zero-group-scales", ERROR, per_engine=False, deep=True)
def zero_group_scales(ctx: Context) -> Iterator[Finding]:
    """GPTQ/AWQ group scales that are zero: a whole module (uncalibrated expert) or some groups.

    Why: invariant 18. Dequantisation is (q - zero) * scale, so a zero scale turns its group into
    zeros; an all-zero module is dead (GPTQModel #1680, #2271: experts that saw no calibration tokens)
    and the engines load it without a word.

    Fix: re-quantize with calibration data that reaches every expert (GPTQModel `fail_safe`).
    """
    result = scan(ctx)
    dead = sorted(n for n, (z, total) in result.zero.items() if z == total)
    partial = sorted(n for n, (z, total) in result.zero.items() if z < total)
    if dead:
        yield finding("QG541", ERROR, f"{len(dead)} GPTQ/AWQ scale tensor(s) are entirely zero: those modules "
                      "output zeros", modules=dead, fix="Re-quantize those modules with calibration reaching them.",
                      effect=LOADS_WRONG, error="silent: the module dequantizes to all zeros")
    if partial:
        yield finding("QG541", WARNING, f"{len(partial)} GPTQ/AWQ scale tensor(s) have zero groups",
                      modules=partial, fix="Check calibration of those modules.",
                      zero_counts={n: result.zero[n][0] for n in partial})
