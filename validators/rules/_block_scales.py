"""Bulk scan of multi-element scale tensors (native fp8 `weight_scale_inv` blocks) for the deep rules.

Only scale tensors are read, never weights. A DeepSeek-V3 fp8 checkpoint has ~46k block scales of
896 floats (~160 MB): each shard's scales are read with one `pread` per run of neighbours
(safetensors stores a shard's F32 tensors first, so they are contiguous) and screened in one
vectorised pass over the raw IEEE bits: a float32 is finite and > 0 exactly when its bits are in
[1, 0x7F7FFFFF]. Only a run that fails the screen is resolved tensor by tensor. numpy is imported
here, lazily, never on the header-only path.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantgate.validators.rules import Context
    from quantgate.validators.safetensors_header import TensorInfo

log = logging.getLogger(__name__)

#: multi-element scale suffixes whose every value must be finite and > 0 (QG501 / QG502)
ARRAY_SCALE_SUFFIXES: tuple[str, ...] = ("weight_scale_inv",)
FLOAT_DTYPES: dict[str, str] = {"F32": "<f4", "BF16": "<u2", "F16": "<f2"}
MAX_GAP = 64 * 1024          # neighbours closer than this share one pread
MAX_SPAN = 64 << 20          # bytes per pread at most
EXP_MASK = 0x7F800000
SIGN_BIT = 0x80000000
LARGEST_GOOD = 0x7F7FFFFF    # largest finite positive float32; bits - 1 wraps 0 to 0xFFFFFFFF


@dataclass
class BlockScan:
    """Names of array scales holding a NaN/Inf (`nonfinite`) or a zero/negative value (`nonpositive`)."""

    nonfinite: list[str] = field(default_factory=list)
    nonpositive: list[str] = field(default_factory=list)
    scanned: int = 0


def _bits(raw: bytes, offset: int, info: "TensorInfo"):
    """float32 bit patterns (uint32 array) of one tensor's values."""
    import numpy as np

    n = info.numel
    if info.dtype == "F32":
        return np.frombuffer(raw, dtype="<u4", count=n, offset=offset)
    if info.dtype == "BF16":
        return np.frombuffer(raw, dtype="<u2", count=n, offset=offset).astype(np.uint32) << 16
    return np.frombuffer(raw, dtype="<f2", count=n, offset=offset).astype("<f4").view("<u4")


def _classify(bits, name: str, scan: BlockScan) -> None:
    import numpy as np

    nonfinite = (bits & EXP_MASK) == EXP_MASK
    if nonfinite.any():
        scan.nonfinite.append(name)
    if np.any(~nonfinite & ((bits == 0) | (bits >= SIGN_BIT))):
        scan.nonpositive.append(name)


def _span_clean(raw: bytes, lo: int, span: list["TensorInfo"]) -> bool:
    """One vectorised screen of a run of F32 tensors laid out 4-byte aligned from `lo`."""
    import numpy as np

    if any(t.dtype != "F32" or (t.start - lo) % 4 for t in span):
        return False
    words = np.frombuffer(raw, dtype="<u4", count=(span[-1].end - lo) // 4)
    if span[-1].end - span[0].start == 4 * sum(t.numel for t in span):     # contiguous: no foreign bytes
        return not bool(np.any((words - np.uint32(1)) > np.uint32(LARGEST_GOOD - 1)))
    mask = np.zeros(len(words), dtype=bool)
    for t in span:
        mask[(t.start - lo) // 4:(t.end - lo) // 4] = True
    return not bool(np.any(((words - np.uint32(1)) > np.uint32(LARGEST_GOOD - 1)) & mask))


def _spans(infos: list["TensorInfo"]) -> list[list["TensorInfo"]]:
    out: list[list[TensorInfo]] = []
    for info in sorted(infos, key=lambda t: t.start):
        if out and info.start - out[-1][-1].end <= MAX_GAP and info.end - out[-1][0].start <= MAX_SPAN:
            out[-1].append(info)
        else:
            out.append([info])
    return out


def block_scale_scan(ctx: "Context") -> BlockScan:
    """Every array scale of every module, screened once per validation (cached on the analysis)."""
    a = ctx.a
    cached = getattr(a, "_block_scan", None)
    if cached is not None:
        return cached
    scan = BlockScan()
    by_file: dict[str, list[TensorInfo]] = defaultdict(list)
    for cls in a.classes:
        for suffix in ARRAY_SCALE_SUFFIXES:
            rep = cls.rep.tensors.get(suffix)
            if rep is None or rep.dtype not in FLOAT_DTYPES:
                continue
            for m in cls.members:
                info = m.tensors[suffix]
                by_file[info.file].append(info)
    root, headers = getattr(ctx.view, "root", None), getattr(ctx.view, "headers", None)
    if by_file and root is not None and headers is not None:
        for file, infos in by_file.items():
            if file in headers:
                _scan_file(root / file, headers[file].data_offset, infos, scan)
    scan.nonfinite.sort()
    scan.nonpositive.sort()
    a._block_scan = scan  # type: ignore[attr-defined]
    return scan


def _scan_file(path, base: int, infos: list["TensorInfo"], scan: BlockScan) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("cannot open %s: %s", path, exc)
        return
    try:
        size = os.fstat(fd).st_size
        for span in _spans(infos):
            span = [t for t in span if base + t.end <= size]     # truncated shards: QG602 reports them
            if not span:
                continue
            lo = span[0].start
            raw = os.pread(fd, span[-1].end - lo, base + lo)
            if len(raw) != span[-1].end - lo:
                continue
            scan.scanned += len(span)
            if _span_clean(raw, lo, span):
                continue
            for t in span:
                _classify(_bits(raw, t.start - lo, t), t.name, scan)
    finally:
        os.close(fd)
