"""What the number-format tests share: the ModelOpt fixtures, the CUDA parameter, bit-exact and
SQNR comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"  # copies of shared/fixtures: ModelOpt 0.47 exports
CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)
# (fixture file suffix, dtype the weight was exported from)
EXPORTS = [("", torch.bfloat16), ("_f32", torch.float32)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, so comparisons are bit for bit (NaN, -0.0 and all)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `approx` against `reference`, in dB (float64)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
