"""ModelOpt's fused 3-D expert form against the scheme table (GPT-OSS / Llama4 experts kept 3-D).

ModelOpt does not unfuse `GptOssExperts` / `Llama4TextExperts`: it writes `experts.gate_up_proj` U8
[E, in/2, out], `experts.gate_up_proj_weight_scale` F8_E4M3 [E, in/16, out] and 0-d `_weight_scale_2` /
`_input_scale` (reference modelopt.md §2, `maybe_transpose_expert_weight_dimensions`). Seen one expert at
a time, back in nn.Linear orientation, those are the table's per-linear [out, in] tensors, so the
single scheme table of `quantgate.validators.schemes` identifies them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantgate.validators.schemes import WEIGHT_SUFFIXES, SchemeSpec, match_scheme

if TYPE_CHECKING:
    from quantgate.validators.safetensors_header import TensorInfo


@dataclass(frozen=True)
class _ExpertView:
    """One expert's slice of a stored 3-D tensor, in nn.Linear orientation (dtype + shape only)."""

    dtype: str
    shape: tuple[int, ...]


def expert_views(tensors: Mapping[str, TensorInfo], transposed: bool) -> dict[str, _ExpertView]:
    """A fused 3-D module's tensors as one expert's [out, ...] tensors: the leading expert dim is dropped
    and, for transposed ([E, in, out]) storage, the last two dims are swapped back; scalars stay scalars.

    ModelOpt keeps GPT-OSS / Llama4 experts 3-D (`experts.gate_up_proj` U8 [E, in/2, out],
    `_weight_scale` F8_E4M3 [E, in/16, out], 0-d `_weight_scale_2` / `_input_scale`: reference
    modelopt.md §2), so every per-expert [out, in] shape function of the table applies to these views.
    """
    weight = next((tensors[s] for s in WEIGHT_SUFFIXES if s in tensors), None)
    n_experts = weight.shape[0] if weight is not None and len(weight.shape) == 3 else None
    views = {}
    for suffix, info in tensors.items():
        shape = tuple(info.shape)
        if len(shape) == 3:
            shape = (shape[2], shape[1]) if transposed else shape[1:]
        elif shape == (n_experts,) and suffix not in WEIGHT_SUFFIXES:
            shape = ()   # stacked per-expert scalars (`per_expert_scalars` names them)
        views[suffix] = _ExpertView(info.dtype, shape)
    return views


def per_expert_scalars(tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Suffixes of a fused 3-D module stored as per-expert [E] scalars where ModelOpt writes 0-d."""
    weight = next((tensors[s] for s in WEIGHT_SUFFIXES if s in tensors), None)
    if weight is None or len(weight.shape) != 3:
        return []
    return sorted(s for s, t in tensors.items() if s not in WEIGHT_SUFFIXES and tuple(t.shape) == (weight.shape[0],))


def match_fused_scheme(dialect: str | None, tensors: Mapping[str, TensorInfo],
                       transposed: bool) -> SchemeSpec | None:
    """`match_scheme` for a fused 3-D expert module (see `expert_views`); the weight must be 3-D."""
    weight = next((tensors[s] for s in WEIGHT_SUFFIXES if s in tensors), None)
    if weight is None or len(weight.shape) != 3:
        return None
    return match_scheme(dialect, expert_views(tensors, transposed))  # type: ignore[arg-type]


def fused_storage(dialect: str | None, tensors: Mapping[str, TensorInfo],
                  transposed: bool) -> tuple[SchemeSpec, bool] | None:
    """(scheme, stored transposed?) of a quantized fused 3-D module: the layout's orientation first,
    then the other one (a checkpoint whose tensors are consistent only as [E, out, in] although the
    architecture stores [E, in, out] is still that scheme; QG308 warns about the orientation)."""
    for orientation in (transposed, not transposed):
        spec = match_fused_scheme(dialect, tensors, orientation)
        if spec is not None:
            return spec, orientation
    return None
