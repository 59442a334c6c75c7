"""Bulk reads of small scale tensors for the deep rules: one open per shard, reads in file order.

`CheckpointView.read_values` opens the file per tensor; at ~90k scalars (DeepSeek-V3 NVFP4) that is
90k opens. Here each shard is opened once, the scales are read in offset order with one `pread`
per run of neighbours, and scalars are unpacked with `struct` (no numpy import); only exotic dtypes
go through `quantgate.validators.values.decode_values`. Never reads weights: callers pass scale tensors only.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import and_, attrgetter, eq, getitem, itemgetter, rshift, sub
from typing import TYPE_CHECKING

from quantgate.validators.errors import CheckpointReadError

if TYPE_CHECKING:
    from quantgate.validators.checkpoint import CheckpointView
    from quantgate.validators.rules import Context
    from quantgate.validators.safetensors_header import TensorInfo

log = logging.getLogger(__name__)

#: per-tensor scale suffixes the deep rules read (block scales are never read)
SCALAR_SCALES: tuple[str, ...] = ("input_scale", "weight_scale_2", "weight_global_scale", "input_global_scale",
                                  "weight_scale", "k_scale", "v_scale")
#: a "scalar-like" scale has at most this many elements (FP8 per-tensor shards, CT [1])
MAX_SCALAR_ELEMENTS = 16
#: neighbouring scales closer than this are fetched with one pread
MAX_GAP = 4096
MAX_SPAN = 1 << 20
_STRUCT: dict[str, struct.Struct] = {"F32": struct.Struct("<f"), "F16": struct.Struct("<e"),
                                     "F64": struct.Struct("<d")}
_BF16 = struct.Struct("<H")
_F32_FROM_BITS = struct.Struct("<I")
_F32 = struct.Struct("<f")
_NATIVE_LE = sys.byteorder == "little" and struct.calcsize("f") == 4    # memoryview "f" is native
_VIEW_WIDTH = 16        # view a span as floats when it holds at most this many per scalar read


def worst(values: Iterable[float]) -> float:
    """The value a rule should look at: the first non-finite or non-positive one, else the max."""
    best = -math.inf
    for v in values:
        if not math.isfinite(v) or v <= 0:
            return v
        best = max(best, v)
    return best


def _unpack(mm: bytes, offset: int, info: "TensorInfo") -> float | None:
    if info.dtype == "F32" and info.end - info.start == 4:     # the common case
        return _F32.unpack_from(mm, offset)[0]
    fmt = _STRUCT.get(info.dtype)
    n = info.numel
    if fmt is not None:
        vals = [fmt.unpack_from(mm, offset + i * fmt.size)[0] for i in range(n)]
    elif info.dtype == "BF16":
        vals = [_F32.unpack(_F32_FROM_BITS.pack(_BF16.unpack_from(mm, offset + 2 * i)[0] << 16))[0]
                for i in range(n)]
    else:
        from quantgate.validators.values import decode_values

        vals = [float(v) for v in decode_values(mm[offset:offset + info.nbytes], info.dtype, info.shape,
                                                label=info.name).reshape(-1)]
    return worst(vals) if vals else None


@dataclass
class ScaleTable:
    """Per-tensor scale values laid out like the module classes: `by_class[(i, suffix)][j]` is the
    value of `classes[i].members[j].<suffix>` (None when unreadable); `kv` maps KV-scale names."""

    by_class: dict[tuple[int, str], list[float | None]] = field(default_factory=dict)
    kv: dict[str, float | None] = field(default_factory=dict)

    def named(self, classes: list) -> Iterator[tuple[str, float]]:
        """(tensor name, value) for every readable value."""
        for (i, suffix), values in self.by_class.items():
            for m, v in zip(classes[i].members, values):
                if v is not None:
                    yield m.tensors[suffix].name, v
        yield from ((n, v) for n, v in self.kv.items() if v is not None)


def _read_into(view: "CheckpointView", tasks: list[tuple[list, int | str, "TensorInfo"]]) -> None:
    """Fill `target[key] = worst value` for every task, one memory map per shard."""
    root = getattr(view, "root", None)
    headers = getattr(view, "headers", None)
    if root is None or headers is None:
        return
    by_file: dict[str, list] = defaultdict(list)
    for task in tasks:
        if task[2].file in headers:
            by_file[task[2].file].append(task)
    for file, items in by_file.items():
        base = headers[file].data_offset
        items.sort(key=lambda task: task[2].start)
        try:
            fd = os.open(root / file, os.O_RDONLY)
        except OSError as exc:
            log.debug("cannot open %s: %s", file, exc)
            continue
        try:
            size = os.fstat(fd).st_size
            for span in _spans(items):
                lo, hi = span[0][2].start, span[-1][2].end
                if base + hi > size:
                    span = [t for t in span if base + t[2].end <= size]    # truncated: QG602 reports it
                    if not span:
                        continue
                    hi = span[-1][2].end
                raw = os.pread(fd, hi - lo, base + lo)
                for target, key, info in span:
                    try:
                        target[key] = _unpack(raw, info.start - lo, info)
                    except (struct.error, CheckpointReadError, ValueError) as exc:
                        log.debug("cannot decode %s: %s", info.name, exc)
        finally:
            os.close(fd)


def _spans(items: list) -> Iterator[list]:
    """Runs of tasks whose byte ranges are at most MAX_GAP apart (one pread each)."""
    span: list = []
    for task in items:
        info = task[2]
        if span and (info.start - span[-1][2].end > MAX_GAP or info.end - span[0][2].start > MAX_SPAN):
            yield span
            span = []
        span.append(task)
    if span:
        yield span


_START, _FILE = attrgetter("start"), attrgetter("file")
_TENSORS = attrgetter("tensors")


def _read_f32_scalars(view: CheckpointView, jobs: list[tuple[list, list[TensorInfo]]]
                      ) -> list[tuple[list, int, TensorInfo]]:
    """Fast path of `_read_into` for per-class jobs: `values[j]` = the F32 scalar `infos[j]`.

    The members of a module class share every tensor's dtype and shape, so a job is F32 scalars
    throughout or not at all. Per job and shard, the byte range its scalars span is read with one
    pread when it is at most MAX_SPAN bytes (safetensors writes a shard's F32 tensors first, so
    a MoE layer's ~1,000 scales are contiguous) and decoded with C-level maps, not per tensor.
    Returns the tasks left to `_read_into`: other dtypes, scalars far apart (module-order data),
    truncated or unreadable shards.
    """
    root = getattr(view, "root", None)
    headers = getattr(view, "headers", None)
    if root is None or headers is None:
        return []
    rest: list[tuple[list, int, TensorInfo]] = []
    fds: dict[str, int | None] = {}
    try:
        for values, infos in jobs:
            rep = infos[0]
            decoded = None
            if rep.dtype == "F32" and rep.end - rep.start == _F32.size:
                decoded = _f32_job(root, headers, fds, infos)
            if decoded is not None:
                values[:] = decoded
            else:
                rest.extend(zip([values] * len(infos), range(len(infos)), infos))
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return rest


def _f32_job(root, headers: dict, fds: dict[str, int | None], infos: list[TensorInfo]) -> list[float] | None:
    """The F32 scalars `infos` in order, one pread per shard (the span of that shard's scalars),
    or None when a span is too wide or a shard unreadable. A class's members may alternate
    between two shards; every step below is a C-level pass over the members."""
    files, starts = list(map(_FILE, infos)), list(map(_START, infos))
    distinct = set(files)
    if len(distinct) == 1:
        per_file = {files[0]: (min(starts), max(starts) + _F32.size)}
    else:
        per_file = {}
        for file in distinct:
            mine = list(compress(starts, map(eq, files, repeat(file))))     # starts in `file`
            per_file[file] = (min(mine), max(mine) + _F32.size)
    spans: dict[str, tuple[int, bytes]] = {}
    for file, (lo, hi) in per_file.items():
        got = _read_span(root, headers, fds, file, lo, hi)
        if got is None:
            return None
        spans[file] = got
    los = {file: lo for file, (lo, _) in spans.items()}
    offsets = list(map(sub, starts, map(los.__getitem__, files)))     # byte offset in its span
    wide = sum(len(raw) for _, raw in spans.values()) > _VIEW_WIDTH * _F32.size * len(offsets)
    if _NATIVE_LE and not wide and not any(map(and_, offsets, repeat(3))):
        views = {file: memoryview(raw)[:len(raw) - len(raw) % _F32.size].cast("f")
                 for file, (_, raw) in spans.items()}
        return list(map(getitem, map(views.__getitem__, files), map(rshift, offsets, repeat(2))))
    unpack = _F32.unpack_from
    return [unpack(spans[file][1], offset)[0] for file, offset in zip(files, offsets)]


def _read_span(root, headers: dict, fds: dict[str, int | None], file: str, lo: int, hi: int
               ) -> tuple[int, bytes] | None:
    """(lo, bytes lo..hi of `file`'s data section), or None when the span is too wide, the shard
    unknown or unreadable, or the file shorter than its header says."""
    header = headers.get(file)
    if header is None or hi - lo > MAX_SPAN:
        return None
    if file not in fds:
        try:
            fds[file] = os.open(root / file, os.O_RDONLY)
        except OSError as exc:
            log.debug("cannot open %s: %s", file, exc)
            fds[file] = None
    fd = fds[file]
    if fd is None:
        return None
    try:
        raw = os.pread(fd, hi - lo, header.data_offset + lo)
    except OSError as exc:
        log.debug("cannot read %s: %s", file, exc)
        return None
    return (lo, raw) if len(raw) == hi - lo else None


def scale_table(ctx: "Context") -> ScaleTable:
    """Every per-tensor scale of every module and every KV scale, read once per validation."""
    a = ctx.a
    cached = getattr(a, "_scale_table", None)
    if cached is not None:
        return cached
    table = ScaleTable()
    jobs: list[tuple[list, list[TensorInfo]]] = []
    for i, cls in enumerate(a.classes):
        for suffix, t in cls.rep.tensors.items():
            if suffix not in SCALAR_SCALES or t.numel > MAX_SCALAR_ELEMENTS:
                continue
            infos = list(map(itemgetter(suffix), map(_TENSORS, cls.members)))   # m.tensors[suffix]
            values: list[float | None] = [None] * len(infos)
            table.by_class[(i, suffix)] = values
            jobs.append((values, infos))
    tasks: list[tuple[list | dict, int | str, TensorInfo]] = _read_f32_scalars(ctx.view, jobs)
    for name in a.kv_scale_names:
        table.kv[name] = None
        tasks.append((table.kv, name, ctx.view.tensors[name]))
    _read_into(ctx.view, tasks)
    a._scale_table = table  # type: ignore[attr-defined]
    return table


def scale_values(ctx: "Context") -> dict[str, float]:
    """tensor name -> value, for rules that want names (built from the cached table)."""
    a = ctx.a
    cached = getattr(a, "_scale_values", None)
    if cached is None:
        cached = a._scale_values = dict(scale_table(ctx).named(a.classes))  # type: ignore[attr-defined]
    return cached
