"""The strict safetensors header parser: real files, hand-made corrupt ones, and a seeded mini-fuzz."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors_factory import CountingFile, entry, raw_file, tiny_tensors

from quantgate.validators import safetensors_header as sh
from quantgate.validators.errors import CheckpointReadError, HeaderError
from quantgate.validators.safetensors_header import DTYPE_BITS, TensorInfo, parse_header_bytes, read_header


def test_real_file_matches_safetensors_own_reading(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})

    header = read_header(path)

    assert header.metadata == {"format": "pt"}
    assert header.file == "model.safetensors"
    assert header.file_size == path.stat().st_size
    assert set(header.tensors) == set(tensors)
    with safe_open(str(path), framework="numpy") as f:
        for name, info in header.tensors.items():
            assert info.name == name and info.file == "model.safetensors"
            assert info.shape == tuple(f.get_slice(name).get_shape())
            assert info.dtype == f.get_slice(name).get_dtype()
            assert info.nbytes == tensors[name].nbytes and info.numel == tensors[name].size
    # the data offsets really locate the bytes
    raw = path.read_bytes()
    info = header.tensors["lm_head.weight"]
    stored = np.frombuffer(raw[header.data_offset + info.start:header.data_offset + info.end], dtype="<f8")
    np.testing.assert_array_equal(stored.reshape(info.shape), tensors["lm_head.weight"])


def test_tensor_info_is_immutable_and_hashable() -> None:
    info = TensorInfo("w", "U8", (4, 8), "a.safetensors", 0, 32)
    assert info.numel == 32 and info.nbytes == 32
    with pytest.raises(AttributeError):
        info.start = 1  # type: ignore[misc]
    parsed = parse_header_bytes(json.dumps({"w": entry("U8", [4, 8], 0, 32)}).encode(),
                                file_name="a.safetensors", data_size=32)
    assert parsed.tensors["w"] == info
    assert hash(parsed.tensors["w"]) == hash(info)


def test_reads_only_the_header_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    size = 8 * 1024 * 1024
    raw_file(path, {"w": entry("F32", [size // 4], 0, size)}, size)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    counted: list[int] = []
    monkeypatch.setattr(sh, "open", lambda p, mode: CountingFile(p, mode, counted), raising=False)
    read_header(path)
    assert counted == [8, header_len]


def test_header_order_need_not_be_data_order_and_empty_tensors_are_fine() -> None:
    header = {
        "b": entry("F16", [2, 2], 8, 16),
        "a": entry("I32", [2], 0, 8),
        "empty": entry("F32", [0, 5], 16, 16),
        "packed": entry("F4", [4, 2], 16, 20),            # 8 four-bit values = 4 bytes
        "e8m0": entry("F8_E8M0", [3], 20, 23),
        "__metadata__": {"format": "pt"},
    }
    parsed = parse_header_bytes(json.dumps(header).encode(), file_name="x", data_size=23)
    assert [t.name for t in parsed.tensors.values()] == ["b", "a", "empty", "packed", "e8m0"]
    assert parsed.tensors["packed"].numel == 8 and parsed.tensors["packed"].nbytes == 4


def test_dtype_table_covers_the_formats_quantized_checkpoints_use() -> None:
    for dtype in ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "I16", "U16",
                  "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64", "BOOL"):
        assert dtype in DTYPE_BITS
    assert DTYPE_BITS["F4"] == 4 and DTYPE_BITS["F6_E2M3"] == 6 and DTYPE_BITS["BF16"] == 16


def _h(**entries: dict) -> dict:
    return dict(entries)


# (case id, header object or raw bytes, data bytes, declared length override, expected message part)
CORRUPT_CASES = [
    ("oversize-length", b"{}", 0, 200 * 1024 * 1024, "exceeds the"),
    ("length-past-file", b"{}", 0, 4096, "runs past the end"),
    ("not-json", b"{not json", 0, None, "not valid JSON"),
    ("not-utf8", b'{"\xff\xfe": 1}', 0, None, "not valid UTF-8"),
    ("json-array", b"[1, 2, 3]", 0, None, "must be a JSON object"),
    ("json-string", b'"hello"', 0, None, "must be a JSON object"),
    ("entry-not-object", _h(w=[1, 2]), 0, None, "entry must be an object"),
    ("missing-offsets", {"w": {"dtype": "F32", "shape": [1]}}, 4, None, "missing 'data_offsets'"),
    ("bad-dtype", _h(w=entry("F128", [1], 0, 16)), 16, None, "unknown dtype 'F128'"),
    ("dtype-not-string", _h(w=entry(7, [1], 0, 4)), 4, None, "unknown dtype 7"),
    ("negative-shape", _h(w=entry("F32", [-1, 4], 0, 0)), 0, None, "non-negative integers"),
    ("float-shape", b'{"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}', 4, None, "non-integer"),
    ("bool-shape", b'{"w": {"dtype": "U8", "shape": [true], "data_offsets": [0, 1]}}', 1, None, "non-negative"),
    ("nan-shape", b'{"w": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}', 1, None, "non-integer"),
    ("shape-not-list", _h(w=entry("U8", "4", 0, 4)), 4, None, "shape must be a list"),
    ("offset-mismatch", _h(w=entry("F32", [2, 2], 0, 12)), 12, None, "needs 16 bytes"),
    ("offsets-reversed", _h(w=entry("U8", [0], 4, 0)), 4, None, "0 <= start <= end"),
    ("offsets-three", {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, 1, None, "data_offsets"),
    ("f4-half-byte", _h(w=entry("F4", [3], 0, 1)), 1, None, "not a whole number of bytes"),
    ("overlap", _h(a=entry("U8", [8], 0, 8), b=entry("U8", [8], 4, 12)), 12, None, "overlap"),
    ("hole", _h(a=entry("U8", [4], 0, 4), b=entry("U8", [4], 8, 12)), 12, None, "hole of 4 bytes"),
    ("hole-at-start", _h(a=entry("U8", [4], 4, 8)), 8, None, "at the start"),
    ("truncated", _h(a=entry("U8", [64], 0, 64)), 10, None, "truncated: header says 64 bytes of data, file has 10"),
    ("trailing-bytes", _h(a=entry("U8", [4], 0, 4)), 9, None, "5 trailing bytes"),
    ("metadata-non-string", {"__metadata__": {"format": 1}}, 0, None, "must be a string"),
    ("metadata-not-object", {"__metadata__": ["pt"]}, 0, None, "must be an object of strings"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, 0, None, "header"),
]


@pytest.mark.parametrize("header, data, length, message",
                         [c[1:] for c in CORRUPT_CASES], ids=[c[0] for c in CORRUPT_CASES])
def test_corrupt_headers_raise_header_error(tmp_path: Path, header: object, data: int, length: int | None,
                                            message: str) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert message in caught.value.problem
    assert caught.value.path == "bad.safetensors"
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, CheckpointReadError)


def test_tiny_and_unreadable_files(tmp_path: Path) -> None:
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"\x02\x00")
    with pytest.raises(HeaderError, match="too small"):
        read_header(small)
    with pytest.raises(HeaderError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(HeaderError, match="cannot read"):
        read_header(tmp_path)


def test_header_cap_is_overridable(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "x.safetensors", {"w": entry("U8", [4], 0, 4)}, 4)
    assert "w" in read_header(path).tensors
    with pytest.raises(HeaderError, match="exceeds the 16-byte cap"):
        read_header(path, max_header_bytes=16)


def test_duplicate_keys_cannot_hide_a_tensor() -> None:
    # JSON keeps the last duplicate; the first one's bytes then belong to no tensor.
    raw = b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, ' \
          b'"w": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}'
    with pytest.raises(HeaderError, match="hole"):
        parse_header_bytes(raw, file_name="x", data_size=8)


def _valid_header_bytes() -> tuple[bytes, int]:
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i, (dtype, shape) in enumerate([("BF16", [4, 8]), ("F8_E4M3", [4, 2]), ("F32", []), ("U8", [4, 4]),
                                        ("F4", [2, 8]), ("I64", [3])]):
        size = int(np.prod(shape, dtype=np.int64)) * DTYPE_BITS[dtype] // 8
        header[f"model.layers.{i}.w"] = entry(dtype, shape, offset, offset + size)
        offset += size
    return json.dumps(header).encode(), offset


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[pos] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes([rng.choice(b'{}[]",:-0123456789 etrufalsnNI\\')])
        elif op == 2 and data:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            data = data[:pos]
        else:   # swap a digit run for a big, negative or fractional number
            data[pos:pos + 1] = rng.choice([b"-1", b"99999999999999999999", b"1.0", b"1e3", b"0"])
    return bytes(data)


def test_fuzzed_headers_end_in_a_header_or_a_header_error(tmp_path: Path) -> None:
    raw, data_size = _valid_header_bytes()
    rng = random.Random(20240611)
    outcomes = {"parsed": 0, "error": 0}
    for case in range(3000):
        mutated = _mutate(rng, raw)
        size = rng.choice([data_size, data_size - 1, data_size + 3, None])
        try:
            header = parse_header_bytes(mutated, file_name="fuzz.safetensors", data_size=size)
        except HeaderError as exc:
            assert exc.problem and "\n" not in exc.problem, case
            outcomes["error"] += 1
            continue
        outcomes["parsed"] += 1
        end = 0   # whatever parsed must tile its data section
        for info in sorted(header.tensors.values(), key=lambda t: (t.start, t.end)):
            assert info.start == end and info.nbytes * 8 == info.numel * DTYPE_BITS[info.dtype]
            end = info.end
        assert size is None or end == size
    # through the file path too (length prefix mutations), a smaller sample
    for case in range(300):
        blob = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(data_size))
        for _ in range(rng.randint(1, 3)):
            blob[rng.randrange(12)] = rng.randrange(256)
        path = tmp_path / f"f{case % 8}.safetensors"
        path.write_bytes(bytes(blob[: rng.randint(0, len(blob))] if rng.random() < 0.3 else blob))
        try:
            read_header(path)
        except HeaderError:
            outcomes["error"] += 1
    assert outcomes["parsed"] > 0 and outcomes["error"] > 1000
