"""Strict, bounded safetensors header parsing. Never reads tensor data.

A safetensors file is `<u64 little-endian N><N bytes of UTF-8 JSON><data section>`. The JSON maps
tensor names to `{"dtype", "shape", "data_offsets": [start, end]}` (offsets relative to the data
section) plus an optional `"__metadata__"` str -> str map. This module checks everything the
format promises before anyone trusts it: the length prefix against a cap and the file size, UTF-8,
a JSON object, known dtypes, non-negative integer shapes, byte sizes that match dtype x shape, and
offsets that tile the data section exactly (no overlap, no hole, nothing past the end).

It is on the hot path of header-only validation (a DeepSeek-V3 checkpoint has 180k tensors in 72
shards), so the per-tensor loop is kept flat: one JSON decode, then one pass with cheap type
checks; the precise error text is built only when something is wrong.

The JSON decode uses msgspec's C decoder when it is installed (`validators/safetensors_fast.py`,
about twice as fast as `json` on these headers) and the standard library otherwise. The stdlib
path here is the reference: any decode error or problem on the fast path is re-checked on it, so
the messages are the same whichever decoder is installed.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from quantgate.validators.errors import HeaderError

# Bits per element of every dtype safetensors (Rust `Dtype`) defines. F4/F6 are packed, so a
# tensor's byte size is numel * bits / 8 and must come out whole.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8, "I8": 8, "U16": 16, "I16": 16, "U32": 32, "I32": 32, "U64": 64, "I64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F16": 16, "BF16": 16, "F32": 32, "F64": 64,
}

# dtype -> (the table's own string, bits): the parser stores the shared string, not one per tensor.
_DTYPE_ENTRY: dict[str, tuple[str, int]] = {name: (name, bits) for name, bits in DTYPE_BITS.items()}

MAX_HEADER_BYTES: int = 100 * 1024 * 1024   # safetensors' own limit on the JSON header
LENGTH_PREFIX_BYTES = 8                     # the u64 header length
METADATA_KEY = "__metadata__"


class TensorInfo(NamedTuple):
    """One tensor as its header describes it; offsets are relative to the file's data section.

    Immutable and hashable. A NamedTuple rather than a dataclass because a DeepSeek-V3 checkpoint
    has 180k of them: a tuple is built with one C call (see `_check_tensors`), a frozen dataclass
    with one setter call per field. Construct it by keyword or position as before.
    """

    name: str
    dtype: str          # safetensors dtype string, a key of DTYPE_BITS
    shape: tuple[int, ...]
    file: str           # shard file name relative to the checkpoint root
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    file: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_offset: int            # 8 + header length: where the data section starts in the file
    file_size: int | None       # None when unknown (never for local files)


# `TensorInfo(name, ...)` goes through a Python-level __new__; the parser calls the C one directly.
_new_tuple = tuple.__new__


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building large acyclic structures (json.loads of 180k entries
    triggers many useless collections); restores the previous state."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES,
                file_name: str | None = None) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at `path`.

    Reads exactly the first 8 + N bytes (N = the declared header length) and nothing else.
    `file_name` names the file in messages and in `TensorInfo.file` (default: `path.name`).
    Raises HeaderError for anything malformed; OSError (unreadable file) is turned into one too.
    """
    name = file_name if file_name is not None else Path(path).name
    try:
        with open(path, "rb") as f:
            file_size = _fstat_size(f)
            length = header_length(f.read(LENGTH_PREFIX_BYTES), name, file_size, max_header_bytes)
            raw = bytearray(length)     # mutable: the typed decoder reads it without a copy
            got = f.readinto(raw)
    except OSError as exc:
        raise HeaderError(name, f"cannot read file: {exc.strerror or exc}") from exc
    if got != length:
        raise HeaderError(name, f"truncated: header says {length} header bytes, file has {got}")
    return parse_header_bytes(raw, file_name=name, data_size=file_size - LENGTH_PREFIX_BYTES - length)


def _fstat_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def header_length(prefix: bytes, file_name: str, file_size: int | None,
                  max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """Decode and bound the u64 little-endian header length from the first 8 bytes of a file."""
    if len(prefix) < LENGTH_PREFIX_BYTES:
        raise HeaderError(file_name, f"file is {len(prefix)} bytes long: too small to be safetensors "
                                     f"(needs at least an 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX_BYTES])
    if length > max_header_bytes:
        raise HeaderError(file_name, f"header length {length} exceeds the {max_header_bytes}-byte cap "
                                     f"(corrupt or hostile file)")
    if file_size is not None and LENGTH_PREFIX_BYTES + length > file_size:
        raise HeaderError(file_name, f"truncated: header length {length} runs past the end of the "
                                     f"{file_size}-byte file")
    if length < 2:
        raise HeaderError(file_name, f"header length {length} is too small for a JSON object")
    return length


def parse_header_bytes(raw: bytes | bytearray, *, file_name: str, data_size: int | None) -> SafetensorsHeader:
    """Parse the JSON header bytes of one file (without the 8-byte length prefix) and check it.

    `data_size` is the size of the data section (file size - 8 - len(raw)); None skips the checks
    that need it (the tensors must still tile [0, end) without holes or overlaps).
    """
    from quantgate.validators.safetensors_fast import parse_fast  # imports this module: not at the top

    with gc_paused():
        parsed = parse_fast(raw, file_name, data_size)
        if parsed is None:      # no fast decoder, or something to report: the reference path
            obj = _decode_json(raw, file_name)
            metadata = _check_metadata(obj.pop(METADATA_KEY, None), file_name)
            tensors = _check_tensors(obj, file_name, data_size)
        else:
            metadata, tensors = parsed
    return SafetensorsHeader(
        file=file_name,
        tensors=tensors,
        metadata=metadata,
        data_offset=LENGTH_PREFIX_BYTES + len(raw),
        file_size=None if data_size is None else LENGTH_PREFIX_BYTES + len(raw) + data_size,
    )


def _reject_number(literal: str) -> object:
    """json hook: a safetensors header holds only strings and integers (no 1.5, NaN, Infinity)."""
    raise ValueError(f"non-integer number {literal[:40]!r} (shapes and offsets must be integers)")


def _decode_json(raw: bytes, file_name: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(file_name, f"header is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        obj = json.loads(text, parse_float=_reject_number, parse_constant=_reject_number)
    except RecursionError:
        raise HeaderError(file_name, "header JSON is nested too deeply") from None
    except ValueError as exc:
        raise HeaderError(file_name, f"header is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise HeaderError(file_name, f"header must be a JSON object, got {_json_type(obj)}")
    return obj


def _check_metadata(metadata: object, file_name: str) -> dict[str, str] | None:
    if metadata is None:
        return None
    if type(metadata) is not dict:
        raise HeaderError(file_name, f"{METADATA_KEY} must be an object of strings, got {_json_type(metadata)}")
    for key, value in metadata.items():
        if type(value) is not str:
            raise HeaderError(file_name, f"{METADATA_KEY}[{key!r}] must be a string, got {_json_type(value)}")
    return metadata


def _check_tensors(entries: dict, file_name: str, data_size: int | None, *,
                   exact_keys: bool = False) -> dict[str, TensorInfo]:
    """One flat pass over the entries: TensorInfo objects in header order; HeaderError on the
    first malformed entry, hole, overlap or size mismatch. `exact_keys` (the fast decoder, which
    lets floats through) also refuses entries with keys besides dtype, shape and data_offsets.

    Shapes repeat (thousands of experts share a handful), so each distinct shape is checked once
    and its tuple shared. The cache is keyed by tuple equality, under which a JSON `true` equals
    1 and `false` equals 0: a shape holding a 0 or 1 is therefore re-checked element by element
    on every hit (rare: scale shapes are `[]`, weight dims are large), any other hit is exact.
    Floats never get here (rejected while decoding), so equal tuples mean equal JSON integers.
    """
    tensors: dict[str, TensorInfo] = {}
    dtype_entry = _DTYPE_ENTRY.get
    new, info_type = _new_tuple, TensorInfo
    # shape -> (shared tuple, numel, whether equal-comparing booleans must be ruled out on a hit)
    shapes: dict[tuple[int, ...], tuple[tuple[int, ...], int, bool]] = {}
    known_shape = shapes.get
    expected_start = 0          # tensors usually come in data order: verify tiling on the fly
    in_order = True
    for name, entry in entries.items():
        try:
            dtype = entry["dtype"]
            shape = entry["shape"]
            start, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise HeaderError(file_name, _entry_problem(name, entry)) from None
        known = dtype_entry(dtype) if type(dtype) is str else None
        if known is None or type(shape) is not list or type(start) is not int or type(end) is not int \
                or (exact_keys and len(entry) != 3):
            raise HeaderError(file_name, _entry_problem(name, entry))
        dtype, bits = known
        key = tuple(shape)
        try:
            cached = known_shape(key)
        except TypeError:       # a nested list in the shape: unhashable
            raise HeaderError(file_name, _entry_problem(name, entry)) from None
        if cached is None or (cached[2] and not all(type(dim) is int for dim in shape)):
            numel = 1
            for dim in shape:
                if type(dim) is not int or dim < 0:
                    raise HeaderError(file_name, _entry_problem(name, entry))
                numel *= dim
            cached = shapes[key] = (key, numel, 0 in key or 1 in key)
        key, numel, _ = cached
        if start < 0 or end < start or numel * bits != (end - start) * 8:
            raise HeaderError(file_name, _entry_problem(name, entry))
        if start != expected_start:
            in_order = False
        expected_start = end
        tensors[name] = new(info_type, (name, dtype, key, file_name, start, end))   # TensorInfo(...)
    _check_extent(tensors, expected_start if in_order else None, file_name, data_size)
    return tensors


def _check_extent(tensors: dict[str, TensorInfo], end: int | None, file_name: str, data_size: int | None) -> None:
    """The tensors tile [0, end) (`end` None: not checked yet, they were out of order) and end
    where the data section does."""
    if end is None:
        end = _check_tiling(tensors.values(), file_name)
    if data_size is not None and end != data_size:
        if end > data_size:
            raise HeaderError(file_name, f"truncated: header says {end} bytes of data, file has {data_size}")
        raise HeaderError(file_name, f"data section has {data_size - end} trailing bytes that "
                                     f"no tensor covers (header covers {end} of {data_size})")


def _check_tiling(tensors: Iterable[TensorInfo], file_name: str) -> int:
    """Tensors sorted by offset must tile [0, end) exactly; returns end. Slow path, only for
    headers whose entries are not already in data order."""
    position = 0
    previous = None
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.start < position:
            raise HeaderError(file_name, f"tensors {previous.name!r} and {info.name!r} overlap "
                                         f"(bytes {info.start}..{position} of the data section)")
        if info.start > position:
            where = f"after {previous.name!r}" if previous else "at the start of the data section"
            raise HeaderError(file_name, f"hole of {info.start - position} bytes {where} "
                                         f"(no tensor covers bytes {position}..{info.start})")
        position = info.end
        previous = info
    return position


def _entry_problem(name: str, entry: object) -> str:
    """The precise complaint about a tensor entry the fast loop rejected."""
    label = f"tensor {name!r}"
    if type(entry) is not dict:
        return f"{label}: entry must be an object, got {_json_type(entry)}"
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            return f"{label}: missing {key!r}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPE_BITS:
        return f"{label}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})"
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        return f"{label}: shape must be a list of non-negative integers, got {_short(shape)}"
    if (type(offsets) is not list or len(offsets) != 2
            or any(type(o) is not int or o < 0 for o in offsets) or offsets[1] < offsets[0]):
        return f"{label}: data_offsets must be [start, end] with 0 <= start <= end, got {_short(offsets)}"
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        return f"{label}: {dtype} {shape} is {bits} bits, not a whole number of bytes"
    return (f"{label}: {dtype} {shape} needs {bits // 8} bytes but data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
