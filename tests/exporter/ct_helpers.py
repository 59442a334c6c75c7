"""Shared compressed-tensors exports for the test_ct_* modules (import `ct_exported_fixture`: the fixture is named `ct_exported`).

Each (arch, recipe) pair is exported once per session: the cache lives at module level because the
fixture is imported by several test modules (each import would otherwise be its own fixture).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

#: Tiny-model sizes for compressed-tensors exports: every in_features a multiple of 128 so W4A16
#: (group 128) covers attention and experts, as in reference/lab_llmc_vllm.md (hidden 128, head_dim 32).
CT_SIZES = {"hidden": 128, "head_dim": 32}
#: Calibration kept tiny, as for the ModelOpt exports (tests/exporter/conftest.py).
CALIB = {"calib_samples": 4, "calib_seq_len": 32, "calib_batch_size": 2}
#: The calibrating recipe exported first; its calibration.json feeds the other calibrating recipe.
CALIBRATING_RECIPE = "nvfp4"
DEVICE = os.environ.get("QUANTGATE_TEST_DEVICE", "cpu")

_CACHE: dict[tuple[str, str], tuple[Path, object]] = {}
_ROOT: list[Path] = []


@pytest.fixture(scope="session", name="ct_exported")
def ct_exported_fixture(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """`ct_exported(arch, recipe)` -> (source dir, QuantizeResult) in the compressed-tensors dialect."""
    from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
    from quantgate.exporter.recipes import get_recipe

    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("ct_exports"))

    def get(arch: str, recipe: str) -> tuple[Path, object]:
        key = (arch, recipe)
        if key not in _CACHE:
            source = tiny_model(arch, **CT_SIZES)
            stats = None
            calibrates = get_recipe(recipe).scheme_name in ("NVFP4", "FP8")
            if calibrates and recipe != CALIBRATING_RECIPE:
                _, first = get(arch, CALIBRATING_RECIPE)
                stats = (first.output or first.temp_output) / "calibration.json"
            req = QuantizeRequest(source=str(source), recipe=recipe, out=_ROOT[0] / f"{arch}-{recipe}",
                                  device=DEVICE, dialect="compressed-tensors", calib_stats=stats, **CALIB)
            _CACHE[key] = (source, run_quantize(req))
        return _CACHE[key]

    return get
