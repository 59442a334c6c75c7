"""Which ModelOpt run our numerics reproduce: ModelOpt 0.47 on CUDA (default) or on the CPU.

ModelOpt's NVFP4/FP8 export divides by Python scalars and by 0-d tensors; torch computes some of
those divisions differently on CUDA (ATen ``div_true_kernel_cuda`` and TensorIterator's casting),
so one ModelOpt release gives two sets of bits. Both are reproduced here with plain fp32 / weight-
dtype operations whose result does not depend on the device we run on:

``modelopt-cuda`` (`MODELOPT_CUDA`, the default: nearly every real ModelOpt export runs on a GPU)
  * ``tensor / python_scalar`` (``amax / 2688`` for ``weight_scale_2`` and NVFP4 ``input_scale``,
    ``amax / 448`` for the FP8 ``weight_scale`` and ``input_scale``) is ``tensor * fl32(1 / scalar)``:
    CUDA's division by a CPU scalar multiplies by the reciprocal, computed once in fp32 on the host
    (measured on an H200: 22% of NVFP4 global scales and 63% of FP8 weight scales move by one ulp).
  * FP8 ``weight / weight_scale`` (BF16/FP16 weight, 0-d fp32 scale moved to the GPU): the common
    dtype is the weight's, so the kernel casts the scale to the weight dtype first, then divides in
    fp32 and rounds the quotient to the weight dtype.
``modelopt-cpu`` (`MODELOPT_CPU`, what the fixtures under tests/exporter/fixtures hold)
  * every division is a correctly rounded fp32 division; the FP8 scale keeps its fp32 value
    (torch's CPU kernel reads a 0-d divisor at its original precision).

Everything else (per-block ``/ (6 * weight_scale_2)``, ``W / (block_scale * weight_scale_2)``, the
E2M1 and E4M3 roundings) is the same on both devices. Reference: reference/lab_modelopt.md §6;
ModelOpt 0.47 ``NVFP4QTensor``, ``export/quant_utils.py`` (``get_weight_scaling_factor_2``,
``to_quantized_weight``), ``export/unified_export_hf.py`` (``_export_quantized_weight``); proven
against ModelOpt run on an H200 by tests/exporter/test_modelopt_cuda_fixtures.py and BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import NumericsError

MODELOPT_CUDA = "modelopt-cuda"
MODELOPT_CPU = "modelopt-cpu"
NUMERICS_MODES: tuple[str, ...] = (MODELOPT_CUDA, MODELOPT_CPU)
DEFAULT_NUMERICS = MODELOPT_CUDA


def check_mode(numerics: str) -> str:
    """``numerics`` if it names a mode, else `NumericsError` listing the modes."""
    if numerics not in NUMERICS_MODES:
        raise NumericsError(f"unknown numerics mode {numerics!r}; choose one of {', '.join(NUMERICS_MODES)}")
    return numerics


def fp32_reciprocal(divisor: float, device: torch.device) -> Tensor:
    """``fl32(1 / fl32(divisor))`` as a 0-d fp32 tensor: the factor CUDA multiplies by."""
    one = torch.ones((), dtype=torch.float32, device=device)
    return one / torch.tensor(divisor, dtype=torch.float32, device=device)


def scalar_div(x: Tensor, divisor: float, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """ModelOpt's fp32 ``x / divisor`` (``divisor`` a Python float) as ``numerics`` computes it.

    x [...] (any float dtype, promoted to fp32 first as ModelOpt's ``.float()``) -> fp32 [...].
    """
    x = x.float()
    if check_mode(numerics) == MODELOPT_CUDA:
        return x * fp32_reciprocal(divisor, x.device)   # one fp32 rounding of an exact-operand product
    return x / torch.tensor(divisor, dtype=torch.float32, device=x.device)


def weight_over_scale(w: Tensor, scale: Tensor, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """ModelOpt's FP8 ``weight / weight_scale`` before the e4m3 cast, in the weight dtype.

    w [rows, in] (bf16/fp16/fp32), scale fp32 [] on w's device -> [rows, in] in w.dtype.
    CUDA rounds the scale to w.dtype before dividing; the CPU divides by the fp32 scale. Either
    way the quotient is computed in fp32 and rounded once to w.dtype.
    """
    divisor = scale.to(w.dtype).float() if check_mode(numerics) == MODELOPT_CUDA else scale.float()
    return (w.float() / divisor).to(w.dtype)
