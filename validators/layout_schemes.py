"""Layout helpers that read the scheme table: logical shapes of weights stored in other orientations
(GPTQ/AWQ `qweight`) and the weight tensor of fused quantized experts (GPT-OSS MXFP4 `*_blocks`)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

from quantgate.validators.layout_table import FUSED_WEIGHTS, MAX_FUSED_EXPERTS, FusedWeight
from quantgate.validators.schemes import WEIGHT_SUFFIXES, match_scheme

if TYPE_CHECKING:
    from quantgate.validators.safetensors_header import TensorInfo


def scheme_logical_shape(tensors: Mapping[str, TensorInfo]) -> tuple[int | None, int | None]:
    """[out, in] of a module whose weight has another scheme's name (GPTQ/AWQ `qweight`, stored
    [in/8, out] or [in, out/8]): the scheme table's matching spec knows its orientation."""
    if WEIGHT_SUFFIXES.isdisjoint(tensors):
        return None, None
    key = tuple(sorted((s, t.dtype, t.shape) for s, t in tensors.items()))
    return _logical_cached(key)


@lru_cache(maxsize=4096)
def _logical_cached(key: tuple) -> tuple[int | None, int | None]:
    from quantgate.validators.safetensors_header import TensorInfo

    infos = {s: TensorInfo(s, dtype, shape, "", 0, 0) for s, dtype, shape in key}
    spec = match_scheme(None, infos)
    if spec is None:
        return None, None
    return spec.logical_from_weight(infos[spec.weight_suffix].shape)


def fused_weight(parts: Mapping[str, TensorInfo]) -> tuple[FusedWeight, TensorInfo] | None:
    """The tensor holding every expert's weight in a fused MoE module, per `FUSED_WEIGHTS`."""
    for fw in FUSED_WEIGHTS:
        info = parts.get(fw.suffix)
        if info is not None and len(info.shape) == fw.ndim and info.shape[0] <= MAX_FUSED_EXPERTS:
            return fw, info
    return None
