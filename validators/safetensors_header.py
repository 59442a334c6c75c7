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

The JSON decode uses msgspec's C decoder when it is installed (about twice as fast as `json` on
these headers) and the standard library otherwise. The stdlib path is the reference: msgspec
accepts no JSON text that `json` rejects except float literals, and those the fast path rules
out (it takes only entries of exactly the three keys, whose values the type checks pin to str and
int); any decode error or problem on the fast path is re-checked on the stdlib path, so the
messages are the same whichever decoder is installed.
"""

from __future__ import annotations

import gc
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from validators.errors import HeaderError

try:        # optional C decoder (see the module docstring); the stdlib path below is the reference
    import msgspec
except ImportError:     # pragma: no cover - depends on the environment
    msgspec = None

#: bytes -> decoded JSON, raising ValueError / RecursionError on bad input; None: stdlib only
fast_json_loads: Callable[[bytes], object] | None = None
#: bytes -> {name: _Entry} for headers of exactly the safetensors entry form (used with the above)
_typed_loads: Callable[[bytes], dict] | None = None
if msgspec is not None:
    class _Entry(msgspec.Struct, gc=False, forbid_unknown_fields=True):
        """One header entry as the typed decoder checks it: a missing or extra key, a non-string
        dtype, a float or boolean in shape or data_offsets, or not two offsets, fails decoding."""

        dtype: str
        shape: tuple[int, ...]
        data_offsets: tuple[int, int]

    fast_json_loads = msgspec.json.Decoder().decode
    _typed_loads = msgspec.json.Decoder(dict[str, _Entry]).decode

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
    with gc_paused():
        parsed = _parse_fast(raw, file_name, data_size) if fast_json_loads is not None else None
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


_METADATA_PREFIX = b'{"' + METADATA_KEY.encode() + b'":{'    # as safetensors writes it: first, compact


def _parse_fast(raw: bytes, file_name: str, data_size: int | None
                ) -> tuple[dict[str, str] | None, dict[str, TensorInfo]] | None:
    """(metadata, tensors) through the optional C decoder, or None when the header must go the
    stdlib path: a decode error, or any problem at all (that path then reports it exactly).
    Headers as safetensors writes them take the typed decoder, anything else the generic one."""
    typed = _parse_typed(raw, file_name, data_size)
    if typed is not None:
        return typed
    try:
        obj = fast_json_loads(raw)      # type: ignore[misc]
    except (ValueError, RecursionError):
        return None
    if type(obj) is not dict:
        return None
    try:
        metadata = _check_metadata(obj.pop(METADATA_KEY, None), file_name)
        return metadata, _check_tensors(obj, file_name, data_size, exact_keys=True)
    except HeaderError:
        return None


def _parse_typed(raw: bytes | bytearray, file_name: str, data_size: int | None
                 ) -> tuple[dict[str, str] | None, dict[str, TensorInfo]] | None:
    """The typed decoder's (metadata, tensors), or None. A leading compact `"__metadata__":{...},`
    is decoded on its own: the first `}` must close it (a `}` in one of its strings or a nested
    object leaves the cut text invalid JSON, so it cannot be mistaken), and the next key must
    follow the comma at once, so `{` + the rest is valid exactly when the whole header is."""
    if _typed_loads is None or fast_json_loads is None:
        return None
    metadata = None
    comma = -1
    if raw.startswith(_METADATA_PREFIX):
        close = raw.find(b"}", len(_METADATA_PREFIX))
        if close < 0 or raw[close + 1:close + 3] != b',"':
            return None
        try:
            metadata = fast_json_loads(raw[len(_METADATA_PREFIX) - 1:close + 1])
        except (ValueError, RecursionError):
            return None
        comma = close + 1
    try:
        entries = _decode_entries(raw, comma)
    except (ValueError, RecursionError):
        return None
    if METADATA_KEY in entries:     # a second (or only, not leading) metadata key: the generic path
        return None
    try:
        return _check_metadata(metadata, file_name), _check_typed(entries, file_name, data_size)
    except HeaderError:
        return None


def _decode_entries(raw: bytes | bytearray, comma: int) -> dict:
    """The typed decoder on `raw`, or on `{` + what follows position `comma` (the comma after
    the metadata). A bytearray (`read_header`'s own buffer) has that comma swapped for `{` while
    the decoder reads it in place, and put back: no copy of a header of up to 100 MB."""
    if comma < 0:
        return _typed_loads(raw)      # type: ignore[misc]
    if type(raw) is not bytearray:
        return _typed_loads(b"{" + raw[comma + 1:])      # type: ignore[misc]
    raw[comma] = 0x7B       # ord("{")
    try:
        with memoryview(raw) as whole, whole[comma:] as body:
            return _typed_loads(body)      # type: ignore[misc]
    finally:
        raw[comma] = 0x2C   # ord(",")


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


def _check_typed(entries: dict, file_name: str, data_size: int | None) -> dict[str, TensorInfo]:
    """`_check_tensors` for entries the typed C decoder built (`_Entry`: a str dtype, a tuple of
    ints, two ints; no other key). Only the checks the types leave are made; any problem raises
    a bare HeaderError, for the caller to re-check the header on the reference path."""
    tensors: dict[str, TensorInfo] = {}
    dtype_entry = _DTYPE_ENTRY.get
    new, info_type = _new_tuple, TensorInfo
    shapes: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}    # exact: ints only, no bools
    known_shape = shapes.get
    expected_start = 0
    in_order = True
    for name, entry in entries.items():
        known = dtype_entry(entry.dtype)
        shape = entry.shape
        start, end = entry.data_offsets
        cached = known_shape(shape)
        if cached is None:
            if any(dim < 0 for dim in shape):
                raise HeaderError(file_name, "negative dimension")
            numel = 1
            for dim in shape:
                numel *= dim
            cached = shapes[shape] = (shape, numel)
        shape, numel = cached
        if known is None or start != expected_start or numel * known[1] != (end - start) * 8:
            # one test on the common path (in data order, the right size); which one failed:
            if known is None or start < 0 or end < start or numel * known[1] != (end - start) * 8:
                raise HeaderError(file_name, "malformed entry")
            in_order = False
        expected_start = end
        tensors[name] = new(info_type, (name, known[0], shape, file_name, start, end))   # TensorInfo(...)
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
