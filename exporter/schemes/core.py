"""The registry's types: a scheme, its numerics, its spelling per dialect, its recipes (torch-free).

A `Scheme` is the unit of extension (torchao's config -> registered handler, as one record): what a
weight becomes (`Numerics`: quantize / dequantize / the per-tensor scale a fused group shares / the
static input scale), which fused groups share that scale, whether it needs calibration, how each
dialect spells it on disk (`Form`: the `quantgate.validators.schemes` spec it writes, its config entry,
how the canonical outputs are renamed and converted), and the recipes that use it.

Functions are named as "module:function" strings (`Lazy`) and imported on first call, so the CLI,
the API schema and `recipes` can read names without importing torch.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quantgate.validators.layout import Kind

DECODER_LINEAR_KINDS = frozenset({Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT})
#: The canonical name of the static input scale (what `Numerics.input_scale` returns).
INPUT_SCALE = "input_scale"


class Lazy:
    """A function named "package.module:function", imported on the first call."""

    __slots__ = ("path", "_fn")

    def __init__(self, path: str) -> None:
        if ":" not in path:
            raise ValueError(f"Lazy needs 'module:function', got {path!r}")
        self.path = path
        self._fn: Callable[..., Any] | None = None

    def resolve(self) -> Callable[..., Any]:
        if self._fn is None:
            module, _, name = self.path.partition(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Lazy({self.path!r})"


@dataclass(frozen=True)
class Numerics:
    """One producer's number format for a weight `[..., out, in]`.

    `quantize(w, [scale], [numerics=...], **kwargs)` returns the tensors named `outputs`, in order;
    `dequantize(*outputs, dtype=...)` inverts it (fake quant is `dequantize(*quantize(w))`, derived).
    `scale_arg`: quantize takes a per-tensor scale (a fused group's shared one) as its 2nd argument;
    `numerics_aware`: it takes the ModelOpt rounding mode (`quantgate.exporter.numerics.modes`).
    `group_scale(weights, numerics)`: the per-tensor scale of a fused group from its max amax;
    `scale_from_amax(amax, numerics)`: the same scale from an amax already reduced (3-D experts);
    `input_scale(amax, numerics)`: the static activation scale, for schemes that store one.
    """

    quantize: Lazy
    dequantize: Lazy
    outputs: tuple[str, ...]
    scale_arg: bool = False
    numerics_aware: bool = False
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    group_scale: Lazy | None = None
    scale_from_amax: Lazy | None = None
    input_scale: Lazy | None = None


#: How a canonical per-tensor scale becomes the stored one: name -> (forward, inverse for reading back).
#: `reciprocal`: compressed-tensors stores 1 / ModelOpt's NVFP4 global scales (`ct_global_scale`).
#: `weight_dtype`: the scale in the weight's dtype, rounded up so it still covers amax (CT FP8).
SCALE_CONVERSIONS: dict[str, tuple[Lazy, Lazy | None]] = {
    "reciprocal": (Lazy("quantgate.exporter.numerics.nvfp4:ct_global_scale"),
                   Lazy("quantgate.exporter.numerics.nvfp4:modelopt_global_scale")),
    "weight_dtype": (Lazy("quantgate.exporter.schemes.apply:scale_in_weight_dtype"), None),
}


@dataclass(frozen=True)
class Form:
    """A scheme as one dialect spells it.

    `spec`: the `quantgate.validators.schemes` spec name in `dialect` (its tensor table);
    `writable`: quantgate writes it (else the form is only read back: dequantizer, fake quant);
    `config`: the dialect's config entry (ModelOpt: `config_group`; compressed-tensors:
    `weights` / `input_activations` QuantizationArgs dumps; fp8: nothing beyond the spec's block);
    `renames`: canonical output name -> on-disk suffix; `conversions`: on-disk suffix -> a
    `SCALE_CONVERSIONS` name; `scales_in_weight_dtype`: the weight is quantized with its stored
    (weight-dtype, rounded-up) scale; `numerics`: this producer's own numerics (default: the
    scheme's); `also_reads`: other specs of the dialect the same dequantizer reads;
    `experts_3d`: transposed 3-D experts are written in this form; `architectures`: the only
    architectures whose engine loaders read this form (empty: any), with the loader that does.
    """

    dialect: str
    spec: str
    writable: bool = True
    config: Mapping[str, Any] = field(default_factory=dict)
    renames: Mapping[str, str] = field(default_factory=dict)
    conversions: Mapping[str, str] = field(default_factory=dict)
    scales_in_weight_dtype: bool = False
    numerics: Numerics | None = None
    also_reads: tuple[str, ...] = ()
    experts_3d: bool = False
    architectures: Mapping[str, str] = field(default_factory=dict)

    def loaded_for(self, architecture: str | None) -> bool:
        return not self.architectures or architecture in self.architectures

    def suffix(self, canonical: str) -> str:
        return self.renames.get(canonical, canonical)

    def canonical(self, suffix: str) -> str:
        inverse = {v: k for k, v in self.renames.items()}
        return inverse.get(suffix, suffix)


@dataclass(frozen=True)
class RecipeDef:
    """A named policy over a scheme: modules of `kinds` get it, in the scheme's writable dialects."""

    name: str
    kinds: frozenset[Kind]
    description: str


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme the exporter knows (see the module docstring).

    `dialects`: writable dialects in order, the first the recipes' default (every `Form` whose
    `writable` is true must be listed); `quant_algo`: the ModelOpt name, also the key auto's
    candidates and MIXED_PRECISION layers use; `shared_scale_kinds`: kinds whose fused groups
    (q/k/v, gate/up, an expert's gate/up) share the per-tensor weight scale; `calibrates`: the
    scheme stores static activation scales (the export needs a calibration pass).
    """

    name: str
    numerics: Numerics
    forms: tuple[Form, ...]
    dialects: tuple[str, ...]
    quant_algo: str | None = None
    shared_scale_kinds: frozenset[Kind] = frozenset()
    calibrates: bool = False
    recipes: tuple[RecipeDef, ...] = ()
    description: str = ""

    def form(self, dialect: str) -> Form | None:
        return next((f for f in self.forms if f.dialect == dialect), None)

    def spec_name(self, dialect: str) -> str:
        """The validator spec this scheme is written as in `dialect` (its own name without a form)."""
        form = self.form(dialect)
        return form.spec if form is not None else self.name

    def numerics_for(self, form: Form) -> Numerics:
        return form.numerics or self.numerics


#: Every field of a compressed-tensors `QuantizationArgs` dump, as 0.19 writes them (sorted keys).
_CT_ARGS_FIELDS: dict[str, Any] = {
    "actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
    "observer": "memoryless_minmax", "observer_kwargs": {}, "scale_dtype": None, "strategy": "tensor",
    "symmetric": True, "type": "int", "zp_dtype": None}


def ct_args(**overrides: Any) -> dict[str, Any]:
    """A full `QuantizationArgs` dump (every field, sorted keys) with `overrides`; an unknown field
    raises ValueError (compressed-tensors validates with extra="forbid")."""
    unknown = set(overrides) - set(_CT_ARGS_FIELDS)
    if unknown:
        raise ValueError(f"not QuantizationArgs fields: {sorted(unknown)}")
    args = {**copy.deepcopy(_CT_ARGS_FIELDS), **overrides}
    return dict(sorted(args.items()))
