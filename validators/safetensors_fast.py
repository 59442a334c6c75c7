"""The optional fast path of `safetensors_header.parse_header_bytes`: msgspec's C JSON decoder.

msgspec (a dependency of the bare install) decodes a 180k-tensor header set about twice as fast as `json`. The
stdlib path in `safetensors_header` stays the reference: msgspec accepts no JSON text that `json`
rejects except float literals (same UTF-8 check, same integer digit limit, last duplicate key
wins), and those are ruled out here (the generic decoder's entries must have exactly the three
keys, whose values the type checks pin to str and int; the typed decoder's types refuse them).
Whatever fails here, a decode error or any problem, returns None and the header is parsed again
on the stdlib path, so messages are the same whichever decoder is installed.
"""

from __future__ import annotations

from collections.abc import Callable

from quantgate.validators.errors import HeaderError
from quantgate.validators.safetensors_header import (
    _DTYPE_ENTRY,
    METADATA_KEY,
    TensorInfo,
    _check_extent,
    _check_metadata,
    _check_tensors,
    _new_tuple,
)

try:        # optional: without it `fast_json_loads` is None and every header takes the stdlib path
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


_METADATA_PREFIX = b'{"' + METADATA_KEY.encode() + b'":{'    # as safetensors writes it: first, compact


def parse_fast(raw: bytes | bytearray, file_name: str, data_size: int | None
                ) -> tuple[dict[str, str] | None, dict[str, TensorInfo]] | None:
    """(metadata, tensors) through the optional C decoder, or None when the header must go the
    stdlib path: no such decoder, a decode error, or any problem at all (that path then reports
    it exactly). Headers as safetensors writes them take the typed decoder, others the generic one."""
    if fast_json_loads is None:
        return None
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
