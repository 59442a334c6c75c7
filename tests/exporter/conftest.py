"""Exports of the tiny models, made once per test session and shared by the exporter test modules."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

#: Calibration kept tiny: 4 sequences of 32 random tokens (the issue's "few samples").
CALIB = {"calib_samples": 4, "calib_seq_len": 32, "calib_batch_size": 2}
#: The recipe whose plan is a superset of every other recipe's (every decoder Linear): its
#: calibration.json is reused by the other recipes of the same model through --calib-stats.
CALIBRATING_RECIPE = "nvfp4"
#: `QUANTGATE_TEST_DEVICE=cuda` runs the shared exports (calibration and weight pass) on a GPU.
DEVICE = os.environ.get("QUANTGATE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def exported(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """`exported(arch, recipe)` -> (source dir, QuantizeResult); each pair is exported at most once."""
    from quantgate.exporter.pipeline import QuantizeRequest, run_quantize

    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(arch: str, recipe: str) -> tuple[Path, object]:
        key = (arch, recipe)
        if key not in cache:
            source = tiny_model(arch)
            stats = None
            if recipe != CALIBRATING_RECIPE:
                _, first = get(arch, CALIBRATING_RECIPE)
                stats = (first.output or first.temp_output) / "calibration.json"
            req = QuantizeRequest(source=str(source), recipe=recipe, out=root / f"{arch}-{recipe}", device=DEVICE,
                                  calib_stats=stats, **CALIB)
            cache[key] = (source, run_quantize(req))
        return cache[key]

    return get
