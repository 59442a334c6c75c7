"""Scheme-table entries for Hugging Face native fp8 (config.json quant_method "fp8": DeepSeek-V3/R1,
Qwen3-*-FP8), part of the single scheme table (`quantgate.validators.schemes.SCHEMES` appends
`FP8_NATIVE_SCHEMES`). Source: reference formats_beyond_two.md §2, vLLM `fp8.py`.
"""

from __future__ import annotations

from functools import lru_cache

from quantgate.validators.schemes import (  # import this module only through validators.schemes (cycle)
    FP8_BLOCK,
    FP8_NATIVE,
    SchemeSpec,
    ShapeFn,
    TensorSpec,
    _cdiv,
    _full,
    _one,
    _scalar,
)


def _fp8_block_inv(b0: int, b1: int) -> ShapeFn:
    def shape(out: int, in_: int) -> tuple[int, ...]:
        return (_cdiv(out, b0), _cdiv(in_, b1))  # weight_scale_inv [ceil(out/b0), ceil(in/b1)]

    shape.__name__ = f"fp8_block_inv_{b0}x{b1}"
    return shape


#: scale dtypes of the native fp8 dialect (vLLM's parameters are float32; copy_ converts floats by value)
FP8_NATIVE_SCALE_DTYPES = ("F32", "BF16", "F16")


def fp8_native_spec(block: tuple[int, int] | None, static: bool = False) -> SchemeSpec:
    """The native fp8 spec for a `weight_block_size` (None: per-tensor) and activation scheme.

    Block form: `weight` F8_E4M3 [out, in] + `weight_scale_inv` [ceil(out/b0), ceil(in/b1)] (vLLM
    `Fp8LinearMethod.create_weights`, "The weight_scale_inv name is intentional for deepseekv3");
    per-tensor: `weight_scale` (+ `input_scale` when static). formats_beyond_two.md §2. The 128x128
    and per-tensor specs are entries of SCHEMES (`scheme("fp8", ...)` returns those same objects).
    """
    weight = TensorSpec("weight", ("F8_E4M3",), _full)
    if block is None:
        tensors = [weight, TensorSpec("weight_scale", FP8_NATIVE_SCALE_DTYPES, _scalar, alt_shapes=(_one,))]
        if static:
            tensors.append(TensorSpec("input_scale", FP8_NATIVE_SCALE_DTYPES, _scalar, alt_shapes=(_one,)))
        return SchemeSpec("FP8_TENSOR_STATIC" if static else "FP8_TENSOR", FP8_NATIVE, None, tuple(tensors),
                          weight_bits=8, activation_scales=static,
                          description=f"native fp8, per-tensor weight scale, {'static' if static else 'dynamic'} "
                                      "activations")
    b0, b1 = block
    name = "FP8_BLOCK" if block == (FP8_BLOCK, FP8_BLOCK) else f"FP8_BLOCK_{b0}x{b1}"
    return SchemeSpec(name, FP8_NATIVE, None,
                      (weight, TensorSpec("weight_scale_inv", FP8_NATIVE_SCALE_DTYPES, _fp8_block_inv(b0, b1))),
                      weight_bits=8, group_size=b1, scale_overhead_bits=32 / (b0 * b1), weight_block=(b0, b1),
                      description=f"native fp8, {b0}x{b1} weight blocks (weight_scale_inv), dynamic activations")


FP8_NATIVE_SCHEMES: tuple[SchemeSpec, ...] = (
    fp8_native_spec((FP8_BLOCK, FP8_BLOCK)),
    fp8_native_spec(None, static=False),
    fp8_native_spec(None, static=True),
)


@lru_cache(maxsize=32)
def fp8_native_for(block: tuple[int, int] | None, static: bool = False) -> SchemeSpec:
    """The spec a native fp8 config declares: the SCHEMES entry (same object) for the usual forms,
    one built alike for an unusual block size. Block quantization is dynamic-only in the engines
    (a static claim is a config error, QG103), so `static` is ignored for blocks."""
    key = (tuple(block), False) if block is not None else (None, static)
    for spec in FP8_NATIVE_SCHEMES:
        if spec.dialect == FP8_NATIVE and _native_form(spec) == key:
            return spec
    return fp8_native_spec(key[0], key[1])


def _native_form(spec: SchemeSpec) -> tuple[tuple[int, int] | None, bool]:
    return (spec.weight_block, False) if spec.weight_block else (None, spec.activation_scales)
