"""The optional C JSON decoder (msgspec) gives exactly the stdlib path's results and messages.

Header and index parsing try msgspec first when it is installed and fall back to the stdlib
`json` path on any decode error or problem. These tests run both paths on the same inputs
(hand-made edge cases and a seeded mutation fuzz) and require identical outcomes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors_factory import entry

from quantgate.validators import safetensors_fast as sf
from quantgate.validators.checkpoint import load_json_file, parse_json_object
from quantgate.validators.errors import HeaderError
from quantgate.validators.safetensors_header import DTYPE_BITS, parse_header_bytes

pytest.importorskip("msgspec")


def _parse_outcome(raw: bytes | bytearray, data_size: int | None) -> object:
    try:
        header = parse_header_bytes(raw, file_name="x.safetensors", data_size=data_size)
    except HeaderError as exc:
        return ("error", exc.problem)
    return ("ok", header.metadata, list(header.tensors.items()), header.data_offset, header.file_size)


def _header_outcome(raw: bytes, data_size: int | None, fast: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    """The outcome on one path; on the fast path, from bytes and from a bytearray (decoded in place,
    as `read_header` passes it) alike, and the bytearray is left as it was."""
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(sf, "fast_json_loads", None)
            return _parse_outcome(raw, data_size)
        outcome = _parse_outcome(raw, data_size)
        buffer = bytearray(raw)
        assert _parse_outcome(buffer, data_size) == outcome and buffer == raw
        return outcome


def _json_outcome(raw: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    problems: list = []
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(sf, "fast_json_loads", None)
        obj = parse_json_object(raw, "model.safetensors.index.json", 1 << 20, problems)
    return repr(obj), [(p.code, p.message) for p in problems]


def test_fast_decoders_are_installed_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    generic, typed = sf.fast_json_loads, sf._typed_loads
    assert generic is not None and typed is not None
    monkeypatch.setattr(sf, "fast_json_loads", lambda raw: calls.append("generic") or generic(raw))
    monkeypatch.setattr(sf, "_typed_loads", lambda raw: calls.append("typed") or typed(raw))
    compact = json.dumps({"__metadata__": {"format": "pt"}, "w": entry("U8", [4], 0, 4)},
                         separators=(",", ":")).encode()
    header = parse_header_bytes(compact, file_name="x", data_size=4)
    assert header.metadata == {"format": "pt"} and list(header.tensors) == ["w"]
    assert calls == ["generic", "typed"]        # the metadata object alone, then the entries
    calls.clear()
    spaced = json.dumps({"__metadata__": {"format": "pt"}, "w": entry("U8", [4], 0, 4)}).encode()
    assert list(parse_header_bytes(spaced, file_name="x", data_size=4).tensors) == ["w"]
    assert calls == ["typed", "generic"]        # not the compact form: the generic decoder
    calls.clear()
    assert parse_json_object(b'{"weight_map": {}}', "i", 100, []) == {"weight_map": {}}
    assert calls == ["generic"]


HEADER_CASES = [
    # a float in a key the checks ignore: the C decoder accepts it, json (and so quantgate) must not
    (b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "note": 1.5}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "note": "x"}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [4.0], "data_offsets": [0, 4]}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4e0]}}', 4),
    (b'{"__metadata__": {"a": 1.5}, "w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    (b'{"__metadata__": {"a": NaN}, "w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "v": 1e400}', 4),
    (b'{"w\\ud800": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    ((b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "w": {"dtype": "U8", "shape": [4], '
      b'"data_offsets": [4, 8]}}'), 8),
    (b'{"w": {"dtype": "U8", "shape": [' + b"9" * 4301 + b'], "data_offsets": [0, 4]}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [0, ' + b"9" * 4300 + b'], "data_offsets": [0, 0]}}', 0),
    (b'\xef\xbb\xbf{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}} x', 4),
    (b'{"w\xff": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    (b'{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', None),
    (b"[" * 5000 + b"]" * 5000, 4),
    (b'{"w": [1, 2, 3]}', 4),
    # the compact form safetensors writes (typed decoder), and near misses of it
    (b'{"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 4),
    (b'{"__metadata__":{"format":"pt"},}', 0),
    (b'{"__metadata__":{"format":"pt"}}', 0),
    (b'{"__metadata__":{},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 4),
    (b'{"__metadata__":{"a":"}"},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 4),
    (b'{"__metadata__":{"a":{"b":"c"}},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 4),
    (b'{"__metadata__":{"a":1.5},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 4),
    ((b'{"__metadata__":{"a":"b"},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
      b'"__metadata__":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}'), 4),
    (b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":{"format":"pt"}}', 4),
    (b'{"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4),
    (b'{"w":{"dtype":"U8","shape":[true, 4],"data_offsets":[0,4]}}', 4),
    (b'{"w":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}}', 4),
    (b'{"w":{"dtype":"U9","shape":[4],"data_offsets":[0,4]}}', 4),
    (b'{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2),
    (b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},"v":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 8),
    (b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"v":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', 6),
    (b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 5),
    (b'{"w":{"dtype":"U8","shape":[' + b"9" * 30 + b'],"data_offsets":[0,4]}}', 4),
]


@pytest.mark.parametrize("raw,data_size", HEADER_CASES)
def test_header_edge_cases_match_the_stdlib_path(raw: bytes, data_size: int | None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert _header_outcome(raw, data_size, True, monkeypatch) == _header_outcome(raw, data_size, False, monkeypatch)


def test_float_in_an_ignored_key_is_rejected_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = HEADER_CASES[0][0]
    outcome = _header_outcome(raw, 4, True, monkeypatch)
    assert outcome[0] == "error" and "non-integer number '1.5'" in outcome[1]


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op, pos = rng.randrange(4), rng.randrange(len(data) + 1)
        if op == 0 and pos < len(data):
            data[pos] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"-", b"0", b"1.5", b"1e3",
                                        b"NaN", b"\\", b"\\u00e9", b"\\ud800", b"true", b"null", b" ",
                                        b'"x": 2.5, ', b"\xc3\xa9", b"\xff"])
        elif op == 2:
            del data[pos:pos + rng.randint(1, 6)]
        else:
            data = data[:pos]
    return bytes(data)


def test_fuzzed_headers_give_identical_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i, (dtype, shape) in enumerate([("F32", []), ("BF16", [4, 8]), ("F8_E4M3", [4, 2]), ("U8", [4, 4]),
                                        ("F4", [2, 8]), ("I64", [3])]):
        numel = 1
        for d in shape:
            numel *= d
        size = numel * DTYPE_BITS[dtype] // 8
        header[f"model.layers.{i}.w"] = entry(dtype, shape, offset, offset + size)
        offset += size
    forms = [json.dumps(header).encode(), json.dumps(header, separators=(",", ":")).encode()]
    rng = random.Random(20261203)
    seen = {"ok": 0, "error": 0}
    for case in range(3000):
        mutated = _mutate(rng, forms[case % 2])     # spaced (generic decoder) and compact (typed)
        size = rng.choice([offset, offset, None, offset - 1])
        fast = _header_outcome(mutated, size, True, monkeypatch)
        assert fast == _header_outcome(mutated, size, False, monkeypatch), (case, mutated)
        seen[fast[0]] += 1     # type: ignore[index]
    assert seen["ok"] > 40 and seen["error"] > 500, seen


JSON_CASES = [
    b'{"metadata": {"total_size": 12}, "weight_map": {"a": "m-1.safetensors", "a": "m-2.safetensors"}}',
    b'{"metadata": {"total_size": 1.5e3, "x": -0.0, "y": 0.1000000000000000055511151231257827}}',
    b'{"metadata": {"total_size": 1e400}}',
    b'{"metadata": {"total_size": NaN}}',
    b'{"weight_map": {"a\\ud800": "m.safetensors"}}',
    b'{"weight_map": {"a\\u00e9\\n": "m.safetensors"}}',
    b'{"metadata": {"n": ' + b"9" * 4301 + b"}}",
    b'{"metadata": {"n": ' + b"9" * 4300 + b"}}",
    b'\xef\xbb\xbf{"weight_map": {}}',
    b'{"weight_map": {"a": "m\xff"}}',
    b'{"weight_map": {}} trailing',
    b'["not", "an", "object"]',
    b'{"weight_map": [1, 2]}',
    b"[" * 5000 + b"]" * 5000,
    b"",
]


@pytest.mark.parametrize("raw", JSON_CASES)
def test_json_objects_match_the_stdlib_path(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _json_outcome(raw, True, monkeypatch) == _json_outcome(raw, False, monkeypatch)


def test_fuzzed_json_objects_give_identical_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.dumps({"metadata": {"total_size": 1234, "f": 0.25},
                      "weight_map": {f"model.layers.{i}.w": f"m-{i % 3}.safetensors" for i in range(8)}}).encode()
    rng = random.Random(7)
    for case in range(1500):
        mutated = _mutate(rng, raw)
        assert _json_outcome(mutated, True, monkeypatch) == _json_outcome(mutated, False, monkeypatch), mutated


SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX_CASES = [
    (b'{"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors", '
     b'"b": "model-00002-of-00002.safetensors"}}'),
    b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}, "metadata": {"total_size": 8}}',
    (b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors"}, '
     b'"weight_map": {"b": "model-00002-of-00002.safetensors"}}'),
    b'{"weight_map": {"a": "model-00003-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}',
    b'{"weight_map": {"a": 7, "b": ["../etc/passwd"]}}',
    b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": 1e400}}',
    b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}, "metadata": NaN}',
    b'{"weight_map": {"a": "model-00001-of-00002.safetensors",}}',
    b'{"weight_map": "model-00001-of-00002.safetensors"}',
    b'["weight_map"]',
    b'{"weight_map": {"a\\u00e9": "model-00001-of-00002.safetensors"}} ',
]


def _index_outcome(path: Path, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    problems: list = []
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(sf, "fast_json_loads", None)
        index = load_json_file(path, "model.safetensors.index.json", 1 << 20, problems, shard_names=SHARDS)
    return index, [(p.code, p.message) for p in problems]


@pytest.mark.parametrize("raw", INDEX_CASES)
def test_index_with_shard_names_matches_the_stdlib_path(raw: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(raw)
    fast, slow = _index_outcome(path, True, monkeypatch), _index_outcome(path, False, monkeypatch)
    assert repr(fast) == repr(slow)


def test_index_values_are_one_string_per_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"model.layers.{i}.weight" for i in range(6)]
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(json.dumps({"weight_map": {n: SHARDS[i % 2] for i, n in enumerate(names)}}).encode())
    index, problems = _index_outcome(path, True, monkeypatch)
    values = list(index["weight_map"].values())
    assert problems == [] and values == [SHARDS[i % 2] for i in range(6)]
    assert len({id(v) for v in values}) == 2        # shared, not six copies
    path.write_bytes(INDEX_CASES[3])        # one value names no shard on disk: equal, plain strings
    index, _ = _index_outcome(path, True, monkeypatch)
    assert index["weight_map"] == {"a": "model-00003-of-00002.safetensors", "b": SHARDS[1]}
