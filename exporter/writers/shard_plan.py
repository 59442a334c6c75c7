"""What the export's shards hold: planned before any weight is read.

Every output tensor's name, dtype and shape is known before any weight is read (the scheme table
gives the quantized shapes), so shards are planned up front: units (a fused group's tensors, or one
pass-through tensor) are packed in order into shards of at most `shard_size` bytes (a unit larger
than that gets a shard of its own), and the file names and the index are final from the start.
The writing is exporter.writers.sharding's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from quantgate.validators.safetensors_header import DTYPE_BITS

DEFAULT_SHARD_SIZE = 5_000_000_000          # bytes: the Hub's usual 5 GB (transformers v4's default; v5 writes up to 50GB)
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

