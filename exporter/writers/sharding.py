"""Shard planning and writing for a streaming export.

Every output tensor's name, dtype and shape is known before any weight is read (the scheme table
gives the quantized shapes), so shards are planned up front: units (a fused group's tensors, or one
pass-through tensor) are packed in order into shards of at most `shard_size` bytes (a unit larger
than that gets a shard of its own), and the file names and the index are final from the start.
The writer streams each produced tensor to its planned offset (`pwrite`), so it holds only the unit
in hand, never a shard.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors.torch import save_file

from quantgate.validators.safetensors_header import DTYPE_BITS

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000          # bytes, transformers' "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADER_ALIGN = 8                            # safetensors pads its JSON header to this
SYNC_EVERY = 256 * 2**20                    # bytes written between background fdatasyncs of a shard
MAX_WRITE = 1 << 30                         # bytes per pwrite call (Linux caps one at ~2 GiB)


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
    """Streams planned shards to disk: no shard is ever held in memory.

    Every tensor's name, dtype and shape is planned, so a shard's safetensors header (and with it
    every tensor's byte offset) is final before its first tensor is produced. Each produced tensor
    is written at its offset with `pwrite` and released at once, so memory holds only the unit in
    hand (`max_buffered_bytes` records that high-water mark). The file is byte-identical to
    `safetensors.torch.save_file` of the same tensors (same order, header and padding).

    Durability overlaps with production: a background thread `fdatasync`s a shard every
    `sync_every` bytes written and, once the shard is complete, fsyncs and renames it from
    `.<name>.partial` into place. `close()` waits for that. `on_buffer(nbytes)` (tests) is called
    with the bytes held after each unit.
    """

    def __init__(self, out_dir: Path, on_buffer: Callable[[int], None] | None = None, *,
                 sync_every: int = SYNC_EVERY) -> None:
        self.out_dir = out_dir
        self.max_buffered_bytes = 0
        self.on_buffer = on_buffer
        self.sync_every = sync_every
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantgate-fsync")
        self._syncs: list[Future] = []

    def close(self) -> None:
        """Wait until every shard written is on disk and in place; re-raises an I/O error."""
        try:
            for future in self._syncs:
                future.result()
        finally:
            self._syncer.shutdown(wait=True)

    def write(self, shard: Shard[U], produce: Callable[[Unit[U]], dict[str, torch.Tensor]],
              after_unit: Callable[[Unit[U]], None] | None = None) -> None:
        header, offsets = shard_header([t for u in shard.units for t in u.tensors])
        path = self.out_dir / shard.file
        tmp = path.with_name(f".{path.name}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        handed_off = False
        try:
            _pwrite_all(fd, header, 0)
            base = len(header)
            unsynced = 0
            for unit in shard.units:
                tensors = produce(unit)
                expected = {t.name: t for t in unit.tensors}
                if set(tensors) != set(expected):
                    raise RuntimeError(f"unit {unit.key} produced {sorted(tensors)} instead of {sorted(expected)}")
                held = 0
                for name, tensor in tensors.items():
                    _check(tensor, expected[name])
                    data = tensor_bytes(tensor)
                    held += len(data)
                    _pwrite_all(fd, data, base + offsets[name])
                unsynced += held
                self.max_buffered_bytes = max(self.max_buffered_bytes, held)
                if self.on_buffer is not None:
                    self.on_buffer(held)
                del tensors
                if after_unit is not None:
                    after_unit(unit)
                if unsynced >= self.sync_every:
                    self._syncs.append(self._syncer.submit(os.fdatasync, fd))
                    unsynced = 0
            self._syncs.append(self._syncer.submit(_finish_shard, fd, tmp, path))
            handed_off = True
        finally:
            if not handed_off:   # a failed produce: the background syncs of this fd must end first
                for future in self._syncs:
                    future.exception()
                os.close(fd)


def shard_header(tensors: Sequence[OutTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The safetensors header of `tensors` as `save_file` lays it out, and each tensor's data offset.

    Order: larger element alignment first, then by name (safetensors sorts so every tensor stays
    aligned); the JSON is compact, metadata first, padded with spaces to a multiple of 8 bytes.
    Returns (8-byte length + header, name -> offset in the data section).
    """
    ordered = sorted(tensors, key=lambda t: (-_alignment(t.dtype), t.name))
    entries: dict[str, object] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for t in ordered:
        if t.name in offsets:
            raise RuntimeError(f"tensor {t.name} is planned twice in one shard")
        offsets[t.name] = position
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [position, position + t.nbytes]}
        position += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _alignment(dtype: str) -> int:
    return max(1, DTYPE_BITS[dtype] // 8)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view[:MAX_WRITE], offset)
        view = view[n:]
        offset += n


def _finish_shard(fd: int, tmp: Path, path: Path) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_units(shards: Iterable[Shard[U]]) -> Iterable[Unit[U]]:
    for shard in shards:
        yield from shard.units


def patch_tensors(out_dir: Path, shards: Sequence[Shard[U]], data: dict[str, bytes]) -> None:
    """Overwrite planned tensors of written shards in place: each name's bytes at its planned offset
    (`shard_header`), then `fdatasync` each touched file. Used for tensors known only after the
    weight pass (exporter.deferred_scales); the sizes must be the planned ones."""
    remaining = dict(data)
    for shard in shards:
        tensors = [t for u in shard.units for t in u.tensors]
        mine = {t.name: t for t in tensors if t.name in remaining}
        if not mine:
            continue
        header, offsets = shard_header(tensors)
        fd = os.open(out_dir / shard.file, os.O_WRONLY)
        try:
            for name, spec in mine.items():
                raw = remaining.pop(name)
                if len(raw) != spec.nbytes:
                    raise RuntimeError(f"{name}: patch of {len(raw)} bytes, planned {spec.nbytes}")
                _pwrite_all(fd, raw, len(header) + offsets[name])
            os.fdatasync(fd)
        finally:
            os.close(fd)
    if remaining:
        raise RuntimeError(f"patched tensors not in the shard plan: {sorted(remaining)[:3]}")
