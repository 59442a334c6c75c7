"""Writing planned shards for a streaming export (the plan: exporter.writers.shard_plan).

The writer streams each produced tensor to its planned offset (`pwrite`), so it holds only the unit
in hand, never a shard; each shard's blocks are reserved when it is opened
(exporter.writers.preallocate: a full disk fails at once, and the writes run faster); a shard is
synced and renamed into place after its last unit.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from quantgate.exporter.writers.preallocate import check_free_space, preallocate
from quantgate.exporter.writers.shard_plan import OutTensor, Shard, Unit
from quantgate.validators.safetensors_header import DTYPE_BITS

log = logging.getLogger(__name__)

HEADER_ALIGN = 8                            # safetensors pads its JSON header to this
SYNC_EVERY = 256 * 2**20                    # bytes written between background fdatasyncs of a shard
MAX_WRITE = 1 << 30                         # bytes per pwrite call (Linux caps one at ~2 GiB)

U = TypeVar("U")


class ShardWriter:
    """Streams planned shards to disk: no shard is ever held in memory.

    Every tensor's name, dtype and shape is planned, so a shard's safetensors header (and with it
    every tensor's byte offset) is final before its first tensor is produced. `place(shards)` fixes
    them; `write_unit(unit, tensors)` then writes one unit's tensors at their offsets with `pwrite`
    from any thread (on a CPU the weight pass's producing threads write what they made; on CUDA the
    thread walking the plan writes), opening the unit's shard on first use. `write_placed` walks
    the units in plan order on the calling thread, taking each unit's held byte count from
    `produce(unit)` (which returns once the unit is written), and finishes each shard after its
    last unit. The file is byte-identical to `safetensors.torch.save_file` of the same tensors
    (same order, header and padding). `write(shard, produce)` is the one-thread form: `produce`
    returns the tensors and they are written here.

    Durability overlaps with production: a background thread `fdatasync`s a shard every
    `sync_every` bytes written. A complete shard is renamed from `.<name>.partial` into place at
    once (the directory it is in is not published until every shard is on disk) and fsynced in the
    background. `close()` waits for those syncs and closes what a failure left open; callers must
    stop every writing thread first. `detach()`, after a successful pass, hands the syncs still
    running to a `Durability` to wait for later (before the export is published), so the caller can
    validate meanwhile. `max_buffered_bytes` records the largest unit held at once;
    `on_buffer(nbytes)` (tests) is called with each unit's bytes.
    """

    def __init__(self, out_dir: Path, on_buffer: Callable[[int], None] | None = None, *,
                 sync_every: int = SYNC_EVERY) -> None:
        self.out_dir = out_dir
        self.max_buffered_bytes = 0
        self.on_buffer = on_buffer
        self.sync_every = sync_every
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantgate-fsync")
        self._syncs: list[Future] = []
        self._placed: dict[int, _Placed] = {}      # id(unit) -> its shard's placement
        self._open_lock = threading.Lock()

    def place(self, shards: Sequence[Shard[U]]) -> None:
        """Fix the header and every tensor's offset of `shards` (before any `write_unit`); fails with
        `OutputSpaceError` when the directory has not room for them all."""
        placed_all = []
        for shard in shards:
            header, offsets = shard_header([t for u in shard.units for t in u.tensors])
            placed = _Placed(self.out_dir / shard.file, header, offsets, len(header) + shard.nbytes)
            placed_all.append(placed)
            for unit in shard.units:
                self._placed[id(unit)] = placed
        check_free_space(self.out_dir.parent, sum(p.size for p in placed_all))   # the user's dir, same filesystem

    def write_unit(self, unit: Unit[U], tensors: Mapping[str, torch.Tensor | HostBytes]) -> int:
        """Write `unit`'s produced tensors at their planned offsets (thread-safe); returns their bytes."""
        placed = self._placed.get(id(unit))
        if placed is None:
            raise RuntimeError(f"unit {unit.key} is not in a placed shard")
        expected = {t.name: t for t in unit.tensors}
        if tensors.keys() != expected.keys():
            raise RuntimeError(f"unit {unit.key} produced {sorted(tensors)} instead of {sorted(expected)}")
        fd = self._fd(placed)
        base = len(placed.header)
        held = 0
        for name, tensor in tensors.items():
            data = checked_bytes(tensor, expected[name])
            held += data.nbytes
            _pwrite_all(fd, data, base + placed.offsets[name])
        return held

    def write_placed(self, shards: Sequence[Shard[U]], produce: Callable[[Unit[U]], int],
                     after_unit: Callable[[Unit[U]], None] | None = None,
                     after_shard: Callable[[int, Shard[U]], None] | None = None) -> None:
        """Walk `shards` (placed) in order: `produce(unit)` returns once the unit is written, with its
        bytes; a shard is synced and renamed in the background after its last unit."""
        for i, shard in enumerate(shards):
            unsynced = 0
            for unit in shard.units:
                held = produce(unit)
                unsynced += held
                self.max_buffered_bytes = max(self.max_buffered_bytes, held)
                if self.on_buffer is not None:
                    self.on_buffer(held)
                if after_unit is not None:
                    after_unit(unit)
                if unsynced >= self.sync_every:
                    self._syncs.append(self._syncer.submit(os.fdatasync, self._fd(self._placed[id(unit)])))
                    unsynced = 0
            placed = self._placed[id(shard.units[-1])]
            fd = self._fd(placed)
            os.replace(placed.tmp, placed.path)   # complete; on disk before the directory is published
            self._syncs.append(self._syncer.submit(_sync_and_close, fd))
            placed.handed_off = True
            if after_shard is not None:
                after_shard(i, shard)

    def write(self, shard: Shard[U], produce: Callable[[Unit[U]], Mapping[str, torch.Tensor | HostBytes]],
              after_unit: Callable[[Unit[U]], None] | None = None) -> None:
        """One shard on this thread: `produce(unit)` returns the unit's tensors, written here."""
        self.place([shard])
        try:
            self.write_placed([shard], lambda unit: self.write_unit(unit, produce(unit)), after_unit)
        finally:
            self._close_unfinished()

    def close(self) -> None:
        """Wait until every shard written is on disk; re-raises an I/O error. Closes the files of
        shards a failure left unfinished (their `.partial` files stay in the temporary directory the
        caller removes)."""
        self.detach().wait()

    def detach(self) -> Durability:
        """Close what a failure left unfinished and hand the background syncs to a `Durability`;
        the writer is done with."""
        self._close_unfinished()
        return Durability(self._syncs, self._syncer)

    def _close_unfinished(self) -> None:
        for placed in {id(p): p for p in self._placed.values()}.values():
            if placed.fd is not None and not placed.handed_off:
                for future in self._syncs:   # background syncs of this fd must end before it closes
                    future.exception()
                os.close(placed.fd)
                placed.fd = None

    def _fd(self, placed: _Placed) -> int:
        fd = placed.fd
        if fd is not None:
            return fd
        with self._open_lock:
            if placed.fd is None:
                if placed.handed_off:
                    raise RuntimeError(f"{placed.path.name} is already finished")
                fd = os.open(placed.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    preallocate(fd, placed.size, placed.path.name, self.out_dir.parent)   # full disk: fails now
                    _pwrite_all(fd, placed.header, 0)
                except BaseException:
                    os.close(fd)
                    raise
                placed.fd = fd
            return placed.fd


class Durability:
    """The background syncs of a finished weight pass: `wait()` returns once every shard is on disk
    (re-raising the first I/O error) and says how many seconds it waited."""

    def __init__(self, syncs: list[Future], syncer: ThreadPoolExecutor) -> None:
        self._syncs = syncs
        self._syncer = syncer
        self._waited: float | None = None

    def wait(self) -> float:
        if self._waited is None:
            t = time.perf_counter()
            try:
                for future in self._syncs:
                    future.exception()
            finally:
                self._syncer.shutdown(wait=True)
                self._waited = time.perf_counter() - t
        for future in self._syncs:
            future.result()   # the first I/O error, on every call
        return self._waited


@dataclass(eq=False)
class _Placed:
    """One shard's file, header and tensor offsets (in its data section)."""

    path: Path
    header: bytes
    offsets: dict[str, int]
    size: int                     # the whole file: header + data
    fd: int | None = None
    handed_off: bool = False      # its final sync and rename are submitted

    @property
    def tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.partial")


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


@dataclass(frozen=True, slots=True)
class HostBytes:
    """One produced tensor as host bytes with its safetensors dtype and shape: what a writer that
    already holds its outputs in host arrays (the batched GPU writer) hands the shard writer, so a
    tensor costs no torch call on its way to disk."""

    data: memoryview          # C-contiguous, little-endian
    dtype: str                # safetensors dtype, e.g. "U8", "F8_E4M3", "F32"
    shape: tuple[int, ...]

    @classmethod
    def of(cls, array: Any, dtype: str) -> HostBytes:
        """From a C-contiguous numpy array (a view of a host tensor); `dtype` names what its bytes hold."""
        return cls(memoryview(array).cast("B"), dtype, array.shape)


def tensor_bytes(tensor: torch.Tensor | HostBytes) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    if isinstance(tensor, HostBytes):
        return tensor.data
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


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint8: "U8", torch.int8: "I8",
    torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


def checked_bytes(tensor: torch.Tensor | HostBytes, spec: OutTensor) -> memoryview:
    """`tensor_bytes(tensor)`, after checking its dtype and shape against the plan."""
    if isinstance(tensor, HostBytes):
        dtype, shape = tensor.dtype, tuple(tensor.shape)
    else:
        dtype, shape = _SAFETENSORS_DTYPE.get(tensor.dtype), tuple(tensor.shape)
    if dtype != spec.dtype or shape != spec.shape:
        raise RuntimeError(f"{spec.name}: produced {dtype} {list(shape)}, planned {spec.dtype} {list(spec.shape)}")
    data = tensor_bytes(tensor)
    if data.nbytes != spec.nbytes:
        raise RuntimeError(f"{spec.name}: produced {data.nbytes} bytes, planned {spec.nbytes}")
    return data


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
