"""Invariants of the validator's speed shortcuts: each must give exactly what the plain way gives."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import tomllib
from safetensors_factory import entry

from quantgate import validators
from quantgate.validators import grouping
from quantgate.validators.errors import HeaderError
from quantgate.validators.report import quantgate_version
from quantgate.validators.safetensors_header import TensorInfo, parse_header_bytes

REPO = Path(__file__).resolve().parents[2]


def test_version_constant_matches_the_package_metadata() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert validators.__version__ == declared == quantgate_version()
    try:
        installed = version("quantgate")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH), not installed
        pytest.skip("quantgate is not installed in this interpreter; pyproject and constant agree")
    assert installed == declared


@pytest.mark.parametrize("shape", [[True, 4], [1, False], [False], [4, True]])
def test_booleans_in_a_shape_are_refused_even_when_an_equal_int_shape_was_seen(shape: list) -> None:
    # the parser shares one tuple per distinct shape; under tuple equality True == 1, False == 0
    ints = [int(d) for d in shape]
    numel = 1
    for d in ints:
        numel *= d
    header = {"a": entry("U8", ints, 0, numel), "b": entry("U8", shape, numel, 2 * numel)}
    with pytest.raises(HeaderError, match="'b'.*shape must be a list of non-negative integers"):
        parse_header_bytes(json.dumps(header).encode(), file_name="x.safetensors", data_size=2 * numel)


def test_a_nested_list_in_a_shape_is_a_header_error_not_a_crash() -> None:
    header = {"a": entry("U8", [[2], 2], 0, 4)}
    with pytest.raises(HeaderError, match="shape must be a list of non-negative integers"):
        parse_header_bytes(json.dumps(header).encode(), file_name="x.safetensors", data_size=4)


def test_shapes_with_zero_and_one_are_shared_and_exact() -> None:
    header = {"a": entry("F32", [1, 3], 0, 12), "b": entry("F32", [1, 3], 12, 24), "c": entry("F32", [0], 24, 24)}
    tensors = parse_header_bytes(json.dumps(header).encode(), file_name="x.safetensors", data_size=24).tensors
    assert tensors["a"].shape is tensors["b"].shape == (1, 3)
    assert tensors["c"] == TensorInfo(name="c", dtype="F32", shape=(0,), file="x.safetensors", start=24, end=24)
    assert tensors["c"].numel == 0 and tensors["b"].nbytes == 12


def _fold_by_definition(names: list[str]) -> list[str]:
    """fold_names as its parts define it: every name split whole by `_split`."""
    groups: dict = defaultdict(list)
    for name in set(names):
        template, fields = grouping._split(name)
        groups[template].append(fields)
    lines = [grouping._render(t, f) for t, rows in groups.items() for f in grouping._fold_fields(rows)]
    return sorted(lines, key=grouping._sort_key)


def test_fold_names_splitting_the_head_once_gives_the_defined_result() -> None:
    experts = [f"model.layers.{layer}.mlp.experts.{e}" for layer in range(3, 9) for e in range(0, 256, 3)]
    assert grouping.fold_names(experts) == _fold_by_definition(experts) == \
        ["model.layers.{3..8}.mlp.experts.{" + ",".join(str(e) for e in range(0, 256, 3)) + "}"]
    rng = random.Random(11)
    segments = ["model", "layers", "0", "1", "01", "10", "007", "", "experts", "x1", "3", "gate_proj"]
    for _ in range(3000):
        names = [".".join(rng.choice(segments) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 12))]
        assert grouping.fold_names(names) == _fold_by_definition(names), names
