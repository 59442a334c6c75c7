"""A registry entry applied to weights: quantize a fused group into a dialect's tensors, fake-quantize,
and read a module's stored tensors back into a weight. The only code path every writer shares.

Scale sharing: the members of a fused group (q/k/v, gate/up, an expert's gate/up) whose kind is in
the scheme's `shared_scale_kinds` are quantized with one per-tensor scale, from their max amax
(vLLM and SGLang fuse them into one parameter with one scale).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.schemes.core import INPUT_SCALE, SCALE_CONVERSIONS, Form, Numerics, Scheme
from quantgate.validators.layout import Kind, Module
from quantgate.validators.schemes import scheme as spec_of
from torch import Tensor

#: Stored shapes a per-tensor scalar takes (ModelOpt `[]`, compressed-tensors `[1]`).
_SCALAR_SHAPES = ((), (1,))


def round_up_to(value: Tensor, dtype: torch.dtype) -> Tensor:
    """`value` (fp32) cast to `dtype`, one ulp up where the cast rounded down: a scale stored in BF16
    must still cover amax / qmax, else the largest weights would clip."""
    cast = value.to(dtype)
    up = torch.nextafter(cast, torch.full_like(cast, float("inf")))
    return torch.where(cast.float() < value, up, cast)


def scale_in_weight_dtype(scale: Tensor, weight_dtype: torch.dtype) -> Tensor:
    """SCALE_CONVERSIONS["weight_dtype"]: the stored scale in the weight's dtype, rounded up."""
    return round_up_to(scale, weight_dtype)


def _convert(form: Form, suffix: str, t: Tensor, weight_dtype: torch.dtype) -> Tensor:
    name = form.conversions.get(suffix)
    if name is None:
        return t
    forward = SCALE_CONVERSIONS[name][0].resolve()
    return forward(t, weight_dtype) if name == "weight_dtype" else forward(t)


def stored_input_scale(scheme: Scheme, form: Form, amax: float, weight_dtype: torch.dtype,
                       shape: tuple[int, ...] = (), numerics: str = DEFAULT_NUMERICS) -> tuple[str, Tensor]:
    """(stored suffix, tensor) of one module's static input scale as `form` writes it, from its calibrated
    input amax: the scheme's `input_scale`, the form's rename and conversion (CT: reciprocal, or the weight
    dtype rounded up), in the planned `shape`. Every writer, and the deferred patch of a weight pass run
    beside calibration, computes input scales here."""
    num = scheme.numerics_for(form)
    assert num.input_scale is not None, f"{scheme.name} has no static input scale"
    t = num.input_scale(torch.tensor(amax, dtype=torch.float32), numerics).to(torch.float32)
    suffix = form.suffix(INPUT_SCALE)
    return suffix, _convert(form, suffix, t, weight_dtype).reshape(shape).clone()


def stored_input_scales(scheme: Scheme, form: Form, amaxes: Sequence[float], weight_dtype: torch.dtype,
                        shape: tuple[int, ...] = (), numerics: str = DEFAULT_NUMERICS) -> tuple[str, Tensor]:
    """`stored_input_scale` of many modules with one weight dtype and planned shape, in one call:
    (suffix, [n, *shape]). The input-scale formulas are element-wise, so entry i has the bits of the
    one-module call for amaxes[i] (tested); a form whose stored scale needs a conversion takes them
    one by one."""
    suffix = form.suffix(INPUT_SCALE)
    if suffix in form.conversions or not amaxes:
        return suffix, torch.stack([stored_input_scale(scheme, form, a, weight_dtype, shape, numerics)[1]
                                    for a in amaxes]) if amaxes else torch.empty((0, *shape))
    num = scheme.numerics_for(form)
    assert num.input_scale is not None, f"{scheme.name} has no static input scale"
    t = num.input_scale(torch.tensor(list(amaxes), dtype=torch.float32), numerics).to(torch.float32)
    return suffix, t.reshape(len(amaxes), *shape)


def quantize(num: Numerics, w: Tensor, scale: Tensor | None = None,
             numerics: str = DEFAULT_NUMERICS) -> tuple[Tensor, ...]:
    """`num.quantize` with the arguments it takes: (w, [scale], [numerics=], **kwargs)."""
    args = (w, scale) if num.scale_arg else (w,)
    kwargs = {"numerics": numerics} if num.numerics_aware else {}
    return tuple(num.quantize(*args, **kwargs, **num.kwargs))


def shares_scale(scheme: Scheme, kind: Kind, members: int) -> bool:
    return members > 1 and kind in scheme.shared_scale_kinds and scheme.numerics.group_scale is not None


def quantize_members(scheme: Scheme, form: Form, modules: Sequence[Module], weights: dict[str, Tensor],
                     input_amax: Callable[[str], float] | None = None,
                     numerics: str = DEFAULT_NUMERICS) -> dict[str, Tensor]:
    """One fused group (or lone module) as `form` stores it: `<module>.<suffix>` -> tensor.

    `weights` (module name -> [out, in]) is consumed; `input_amax(module)` gives the calibrated input
    amax for schemes with static activation scales."""
    num = scheme.numerics_for(form)
    spec = spec_of(form.dialect, form.spec)
    shared = (num.group_scale(list(weights.values()), numerics)
              if shares_scale(scheme, modules[0].kind, len(modules)) else None)
    out: dict[str, Tensor] = {}
    for module in modules:
        w = weights.pop(module.name)
        scale = shared
        if form.scales_in_weight_dtype:   # quantize with the scale as stored (CT FP8)
            base = shared if shared is not None else num.group_scale([w], numerics)
            scale = round_up_to(base, w.dtype).float()
        canonical = dict(zip(num.outputs, quantize(num, w, scale, numerics)))
        for name, t in canonical.items():
            suffix = form.suffix(name)
            t = _convert(form, suffix, t, w.dtype)
            planned = tuple(spec.by_suffix[suffix].shape(module.out_features, module.in_features))
            if planned in _SCALAR_SHAPES:   # each module owns its (possibly shared) scale in the file
                t = t.reshape(planned).clone()
            out[f"{module.name}.{suffix}"] = t
        if num.input_scale is not None and spec.activation_scales:
            assert input_amax is not None, f"{scheme.name} needs calibrated input amax"
            suffix = form.suffix(INPUT_SCALE)
            planned = tuple(spec.by_suffix[suffix].shape(module.out_features, module.in_features))
            out[f"{module.name}.{suffix}"] = stored_input_scale(scheme, form, input_amax(module.name), w.dtype,
                                                                planned, numerics)[1]
    return out


def fake_quant(scheme: Scheme, weights: Sequence[Tensor], kind: Kind) -> list[Tensor]:
    """dequantize(quantize(w)) of one fused group's members, sharing the scale as the export does."""
    num = scheme.numerics
    shared = num.group_scale(list(weights)) if shares_scale(scheme, kind, len(weights)) else None
    return [num.dequantize(*quantize(num, w, shared), dtype=w.dtype) for w in weights]


def dequantize_stored(scheme: Scheme, form: Form, read: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    """A module's weight from its stored tensors (suffix -> tensor) as `form` wrote them."""
    canonical: dict[str, Tensor] = {}
    for suffix, t in read.items():
        name = form.conversions.get(suffix)
        inverse = SCALE_CONVERSIONS[name][1] if name else None
        canonical[form.canonical(suffix)] = inverse(t) if inverse is not None else t
    num = scheme.numerics_for(form)
    return num.dequantize(*(canonical.get(o) for o in num.outputs), dtype=dtype)
