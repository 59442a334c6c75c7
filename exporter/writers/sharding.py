"""Shard planning and writing for a streaming export.

Every output tensor's name, dtype and shape is known before any weight is read (the scheme table
gives the quantized shapes), so shards are planned up front: units (a fused group's tensors, or one
pass-through tensor) are packed in order into shards of at most `shard_size` bytes (a unit larger
than that gets a shard of its own), and the file names and the index are final from the start.
The writer then fills one shard at a time and never holds more than that shard's tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors.torch import save_file

from validators.safetensors_header import DTYPE_BITS

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000          # bytes, transformers' "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutTensor:
    """One tensor the export will contain."""

    name: str
    dtype: str                  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * DTYPE_BITS[self.dtype] // 8


U = TypeVar("U")


@dataclass
class Unit(Generic[U]):
    """A set of output tensors produced together (from one `job`)."""

    tensors: tuple[OutTensor, ...]
    job: U

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def key(self) -> str:
        return min(t.name for t in self.tensors)


@dataclass
class Shard(Generic[U]):
    file: str
    units: list[Unit[U]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def plan_shards(units: Sequence[Unit[U]], shard_size: int) -> list[Shard[U]]:
    """Pack `units` in order into shards of at most `shard_size` bytes and name them like transformers."""
    if shard_size <= 0:
        raise ValueError("shard size must be positive")
    groups: list[list[Unit[U]]] = [[]]
    size = 0
    for unit in units:
        if groups[-1] and size + unit.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += unit.nbytes
    groups = [g for g in groups if g]
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [Shard(file=name, units=group) for name, group in zip(names, groups)]


def index_for(shards: Sequence[Shard[U]]) -> dict:
    """`model.safetensors.index.json` content for planned shards."""
    weight_map = {t.name: s.file for s in shards for u in s.units for t in u.tensors}
    total = sum(s.nbytes for s in shards)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


class ShardWriter:
    """Writes planned shards one at a time; `max_buffered_bytes` records the streaming high-water mark.

    `on_buffer(nbytes)` (tests) is called each time the in-memory buffer grows.
    """

    def __init__(self, out_dir: Path, on_buffer: Callable[[int], None] | None = None) -> None:
        self.out_dir = out_dir
        self.max_buffered_bytes = 0
        self.on_buffer = on_buffer
        # fsync of a written shard overlaps with producing the next one (it holds no tensor memory)
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantgate-fsync")
        self._syncs: list[Future] = []

    def close(self) -> None:
        """Wait until every shard written is on disk (fsync done); re-raises an I/O error."""
        try:
            for future in self._syncs:
                future.result()
        finally:
            self._syncer.shutdown(wait=True)

    def write(self, shard: Shard[U], produce: Callable[[Unit[U]], dict[str, torch.Tensor]],
              after_unit: Callable[[Unit[U]], None] | None = None) -> None:
        buffer: dict[str, torch.Tensor] = {}
        buffered = 0
        for unit in shard.units:
            tensors = produce(unit)
            expected = {t.name: t for t in unit.tensors}
            if set(tensors) != set(expected):
                raise RuntimeError(f"unit {unit.key} produced {sorted(tensors)} instead of {sorted(expected)}")
            for name, tensor in tensors.items():
                _check(tensor, expected[name])
                tensor = tensor.detach().to("cpu").contiguous()
                buffer[name] = tensor
                buffered += tensor.numel() * tensor.element_size()
            self.max_buffered_bytes = max(self.max_buffered_bytes, buffered)
            if self.on_buffer is not None:
                self.on_buffer(buffered)
            if after_unit is not None:
                after_unit(unit)
        tmp = write_atomic_safetensors(self.out_dir / shard.file, buffer, sync=False)
        buffer.clear()
        self._syncs.append(self._syncer.submit(_fsync_and_rename, tmp, self.out_dir / shard.file))


_SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint8: "U8", torch.int8: "I8",
    torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


def _check(tensor: torch.Tensor, spec: OutTensor) -> None:
    dtype = _SAFETENSORS_DTYPE.get(tensor.dtype)
    if dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise RuntimeError(f"{spec.name}: produced {dtype} {list(tensor.shape)}, planned {spec.dtype} "
                           f"{list(spec.shape)}")


def write_atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor], *, sync: bool = True) -> Path:
    """Write a safetensors file under a temporary name; with `sync`, fsync and rename it into place
    now, else return the temporary path for `_fsync_and_rename`."""
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    if sync:
        _fsync_and_rename(tmp, path)
    return tmp


def _fsync_and_rename(tmp: Path, path: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object, indent: int = 2) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_units(shards: Iterable[Shard[U]]) -> Iterable[Unit[U]]:
    for shard in shards:
        yield from shard.units
