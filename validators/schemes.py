"""The single scheme table: which tensors a quantized linear carries, per scheme and dialect.

Both the writer (exporter/) and the validator rules read this table, so a checkpoint we write is
checked against exactly the tensor set we meant to write. Sources: `reference/modelopt.md` §2,
`reference/vllm_sglang.md` §3 and §5, `reference/llmcompressor_and_services.md` §A2.

Shapes are written for a linear whose unquantized weight is `[out, in]` (nn.Linear layout).
Every shape function takes `(out_features, in_features)` and returns the stored shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # validators/ must import fast; TensorInfo is only needed for type hints
    from quantgate.validators.safetensors_header import TensorInfo

ShapeFn = Callable[[int, int], tuple[int, ...]]

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
FP8_NATIVE = "fp8"  # Hugging Face native fp8 (config.json quant_method "fp8": DeepSeek-V3, Qwen3-*-FP8)
DIALECTS: tuple[str, ...] = (MODELOPT, COMPRESSED_TENSORS)
# the engines' other formats (specs in schemes_beyond.py, part of this table)
MXFP4 = "mxfp4"
GPTQ = "gptq"
AWQ = "awq"

NVFP4_BLOCK = 16  # elements per e4m3 block scale along the input dim
FP4_PER_BYTE = 2  # two E2M1 codes per uint8, element 2k in the low nibble
INT4_PER_INT32 = 8  # compressed-tensors pack-quantized: 8 int4 values per int32, LSB first
FP8_BLOCK = 128  # 128 x 128 weight blocks (ModelOpt FP8_PB_WO, CT FP8_BLOCK)
MX_BLOCK = 32  # MXFP8 block (E8M0 scale per 32 elements)
W4A16_GROUP = 128  # compressed-tensors W4A16 preset group size
W4A16_ALT_GROUPS = (32, 64)  # other group sizes llm-compressor recipes use

# global_scale_convention values
AMAX_OVER = "amax_over"  # ModelOpt: weight_scale_2 = amax / (6 * 448), small numbers
RECIPROCAL = "reciprocal"  # compressed-tensors: global_scale = (6 * 448) / amax, large numbers

FLOAT_SCALE_DTYPES = ("BF16", "F32", "F16")  # CT scales follow the module dtype unless set


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- shape functions: (out, in) -> stored shape -------------------------------------------------
def _scalar(out: int, in_: int) -> tuple[int, ...]:
    return ()


def _one(out: int, in_: int) -> tuple[int, ...]:
    return (1,)


def _full(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_)


def _fp4_packed(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_ // FP4_PER_BYTE)  # [out, in/2] uint8


def _nvfp4_block_scale(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_ // NVFP4_BLOCK)  # [out, in/16] e4m3


def _mx_block_scale(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_ // MX_BLOCK)  # [out, in/32] E8M0 as uint8


def _per_row(out: int, in_: int) -> tuple[int, ...]:
    return (out,)


def _per_row_col(out: int, in_: int) -> tuple[int, ...]:
    return (out, 1)


def _fp8_block_2d(out: int, in_: int) -> tuple[int, ...]:
    return (_cdiv(out, FP8_BLOCK), _cdiv(in_, FP8_BLOCK))


def _fp8_block_4d(out: int, in_: int) -> tuple[int, ...]:
    return (_cdiv(out, FP8_BLOCK), 1, _cdiv(in_, FP8_BLOCK), 1)  # vLLM's FP8_PB_WO param layout


def _int4_packed(out: int, in_: int) -> tuple[int, ...]:
    return (out, _cdiv(in_, INT4_PER_INT32))  # [out, ceil(in/8)] int32


def _group_scale(group: int) -> ShapeFn:
    def shape(out: int, in_: int) -> tuple[int, ...]:
        return (out, in_ // group)

    shape.__name__ = f"group_scale_{group}"
    return shape


def _group_zero_point(group: int) -> ShapeFn:
    def shape(out: int, in_: int) -> tuple[int, ...]:
        return (_cdiv(out, INT4_PER_INT32), in_ // group)  # packed along the output dim

    shape.__name__ = f"group_zero_point_{group}"
    return shape


def _weight_shape_vector(out: int, in_: int) -> tuple[int, ...]:
    return (2,)  # int64 [out, in]


def _per_input(out: int, in_: int) -> tuple[int, ...]:
    return (in_,)


# ---- the specs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One tensor a quantized linear carries: `<module>.<suffix>`."""

    suffix: str
    dtypes: tuple[str, ...]  # accepted safetensors dtypes; the first is what the writer writes
    shape: ShapeFn  # canonical stored shape (what the writer writes)
    required: bool = True
    alt_shapes: tuple[ShapeFn, ...] = ()  # other documented shapes loaders also accept

    def accepted_shapes(self, out: int, in_: int) -> tuple[tuple[int, ...], ...]:
        """Canonical shape first, then the documented variants."""
        return (self.shape(out, in_), *(fn(out, in_) for fn in self.alt_shapes))


@dataclass(frozen=True)
class SchemeSpec:
    """A number scheme as one dialect spells it on disk."""

    name: str
    dialect: str
    quant_algo: str | None  # ModelOpt quant_algo; None for compressed-tensors
    tensors: tuple[TensorSpec, ...]
    weight_bits: int
    in_divisor: int = 1  # in_features must be divisible by this
    out_divisor: int = 1
    activation_scales: bool = False  # static activation scales are stored (and required)
    global_scale_convention: str | None = None  # AMAX_OVER (ModelOpt) | RECIPROCAL (CT) | None
    ct_format: str | None = None  # compressed-tensors `format` ("nvfp4-pack-quantized", ...)
    in_pack: int = 1  # logical input elements per stored element of the weight's last dim
    group_size: int | None = None  # elements per weight scale along the input dim
    scale_overhead_bits: float = 0.0  # storage bits per weight spent on group/block scales
    description: str = ""
    weight_block: tuple[int, int] | None = None  # native fp8 `weight_block_size` [b0 (out), b1 (in)]
    # stored weight shape -> logical (out, in), for weights not stored [out, in/pack] (GPTQ [in/8, out])
    logical_shape: Callable[[tuple[int, ...]], tuple[int, int]] | None = None
    weight_ndim: int = 2  # dims of the stored weight of one module (MXFP4 blocks [out, in/32, 16]: 3)
    by_suffix: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_suffix", {t.suffix: t for t in self.tensors})

    @property
    def key(self) -> str:
        """Stable identifier, e.g. "modelopt:NVFP4"."""
        return f"{self.dialect}:{self.name}"

    @property
    def weight_spec(self) -> TensorSpec:
        """The spec of the (possibly packed) weight tensor: always the first entry."""
        return self.tensors[0]

    @property
    def weight_suffix(self) -> str:
        return self.tensors[0].suffix

    @property
    def required_suffixes(self) -> frozenset[str]:
        return frozenset(t.suffix for t in self.tensors if t.required)

    @property
    def suffixes(self) -> frozenset[str]:
        return frozenset(self.by_suffix)

    def logical_from_weight(self, stored_shape: tuple[int, ...]) -> tuple[int, int]:
        """Logical (out_features, in_features) from the stored weight shape (U8 NVFP4 [out, in/2] ->
        (out, in); GPTQ qweight [in/8, out] -> (out, in) through `logical_shape`)."""
        if self.logical_shape is not None:
            return self.logical_shape(tuple(stored_shape))
        inner = 1
        for d in stored_shape[1:]:
            inner *= d
        return stored_shape[0], inner * self.in_pack

    def in_features_from_weight(self, stored_shape: tuple[int, ...]) -> int:
        """Logical in_features from the stored weight shape (U8 NVFP4 [out, in/2] -> in)."""
        return self.logical_from_weight(stored_shape)[1]

    def write_dtype(self, suffix: str) -> str:
        """The dtype the writer uses for `suffix`."""
        return self.by_suffix[suffix].dtypes[0]


def _nvfp4(name: str, dialect: str, with_input: bool, description: str) -> SchemeSpec:
    """NVFP4 as a dialect spells it.

    ModelOpt: `weight`, `weight_scale_2`, `input_scale` (0-d, amax / (6 * 448)); compressed-tensors:
    `weight_packed`, `weight_global_scale`, `input_global_scale` ([1], the reciprocals).
    """
    modelopt = dialect == MODELOPT
    scalar, alt = (_scalar, _one) if modelopt else (_one, _scalar)
    tensors = [
        TensorSpec("weight" if modelopt else "weight_packed", ("U8",), _fp4_packed),
        TensorSpec("weight_scale", ("F8_E4M3",), _nvfp4_block_scale),
        TensorSpec("weight_scale_2" if modelopt else "weight_global_scale", ("F32",), scalar,
                   alt_shapes=(alt,)),
    ]
    if with_input:
        input_suffix = "input_scale" if modelopt else "input_global_scale"
        tensors.append(TensorSpec(input_suffix, ("F32",), scalar, alt_shapes=(alt,)))
    return SchemeSpec(
        name, dialect, ("NVFP4" if with_input else "W4A16_NVFP4") if modelopt else None, tuple(tensors),
        weight_bits=4, in_divisor=NVFP4_BLOCK, activation_scales=with_input,
        global_scale_convention=AMAX_OVER if modelopt else RECIPROCAL,
        ct_format=None if modelopt else "nvfp4-pack-quantized", in_pack=FP4_PER_BYTE, group_size=NVFP4_BLOCK,
        scale_overhead_bits=8 / NVFP4_BLOCK, description=description,
    )


def _fp8(name: str, dialect: str, quant_algo: str | None, weight_scale: TensorSpec,
         **kwargs: Any) -> SchemeSpec:
    """An e4m3 weight [out, in] plus its scale (and, for static activations, an input scale)."""
    tensors = [TensorSpec("weight", ("F8_E4M3",), _full), weight_scale]
    if kwargs.get("activation_scales"):
        modelopt = dialect == MODELOPT
        scale_dtypes = ("F32",) if modelopt else FLOAT_SCALE_DTYPES
        scalar, alt = (_scalar, _one) if modelopt else (_one, _scalar)
        tensors.append(TensorSpec("input_scale", scale_dtypes, scalar, alt_shapes=(alt,)))
    ct_format = None if dialect == MODELOPT else "float-quantized"
    return SchemeSpec(name, dialect, quant_algo, tuple(tensors), weight_bits=8, ct_format=ct_format, **kwargs)


SCHEMES: tuple[SchemeSpec, ...] = (
    # ---- ModelOpt (hf_quant_config.json quant_algo) ----
    _nvfp4("NVFP4", MODELOPT, True, "NVFP4 W4A4: e2m1 weights, e4m3 block-16 scales, static input scale"),
    _nvfp4("NVFP4_WEIGHT_ONLY", MODELOPT, False, "NVFP4 weights, BF16 activations (W4A16_NVFP4)"),
    _fp8("FP8", MODELOPT, "FP8", TensorSpec("weight_scale", ("F32",), _scalar, alt_shapes=(_one,)),
         activation_scales=True, description="FP8 per-tensor weights, static per-tensor activations"),
    _fp8("FP8_PER_CHANNEL", MODELOPT, "FP8_PER_CHANNEL_PER_TOKEN",
         TensorSpec("weight_scale", ("F32",), _per_row, alt_shapes=(_per_row_col,)),
         description="FP8 per-output-channel weights, dynamic per-token activations"),
    _fp8("FP8_PB_WO", MODELOPT, "FP8_PB_WO", TensorSpec("weight_scale", ("F32",), _fp8_block_2d,
                                                       alt_shapes=(_fp8_block_4d,)),
         in_divisor=FP8_BLOCK, out_divisor=FP8_BLOCK, group_size=FP8_BLOCK,
         scale_overhead_bits=32 / FP8_BLOCK**2,
         description="FP8 weights with 128x128 block scales, weight-only"),
    _fp8("MXFP8", MODELOPT, "MXFP8", TensorSpec("weight_scale", ("U8",), _mx_block_scale),
         in_divisor=MX_BLOCK, group_size=MX_BLOCK, scale_overhead_bits=8 / MX_BLOCK,
         description="MXFP8: e4m3 weights with E8M0 block-32 scales"),
    # ---- compressed-tensors (config.json quantization_config, format per module) ----
    _nvfp4("NVFP4", COMPRESSED_TENSORS, True, "nvfp4-pack-quantized W4A4 (reciprocal global scales)"),
    _nvfp4("NVFP4A16", COMPRESSED_TENSORS, False, "nvfp4-pack-quantized weight-only"),
    _fp8("FP8", COMPRESSED_TENSORS, None,
         TensorSpec("weight_scale", FLOAT_SCALE_DTYPES, _one, alt_shapes=(_scalar,)),
         activation_scales=True, description="float-quantized FP8, static per-tensor"),
    _fp8("FP8_DYNAMIC", COMPRESSED_TENSORS, None,
         TensorSpec("weight_scale", FLOAT_SCALE_DTYPES, _per_row_col, alt_shapes=(_per_row,)),
         description="float-quantized FP8, per-channel weights, dynamic per-token activations"),
    _fp8("FP8_BLOCK", COMPRESSED_TENSORS, None, TensorSpec("weight_scale", FLOAT_SCALE_DTYPES, _fp8_block_2d),
         group_size=FP8_BLOCK, scale_overhead_bits=16 / FP8_BLOCK**2,
         description="float-quantized FP8, 128x128 weight blocks, dynamic group-128 activations"),
    SchemeSpec(
        "W4A16", COMPRESSED_TENSORS, None,
        (TensorSpec("weight_packed", ("I32",), _int4_packed),
         TensorSpec("weight_scale", FLOAT_SCALE_DTYPES, _group_scale(W4A16_GROUP),
                    alt_shapes=(*(_group_scale(g) for g in W4A16_ALT_GROUPS), _per_row_col)),
         TensorSpec("weight_shape", ("I64",), _weight_shape_vector),
         TensorSpec("weight_zero_point", ("I32",), _group_zero_point(W4A16_GROUP), required=False,
                    alt_shapes=tuple(_group_zero_point(g) for g in W4A16_ALT_GROUPS)),
         TensorSpec("weight_g_idx", ("I32",), _per_input, required=False)),
        weight_bits=4, in_divisor=W4A16_GROUP, ct_format="pack-quantized", in_pack=INT4_PER_INT32,
        group_size=W4A16_GROUP, scale_overhead_bits=16 / W4A16_GROUP,
        description="pack-quantized int4 weights, group 128, BF16 activations",
    ),
    SchemeSpec(
        "W8A8", COMPRESSED_TENSORS, None,
        (TensorSpec("weight", ("I8",), _full),
         TensorSpec("weight_scale", FLOAT_SCALE_DTYPES, _per_row_col, alt_shapes=(_per_row,))),
        weight_bits=8, ct_format="int-quantized",
        description="int-quantized int8 per-channel weights, dynamic per-token int8 activations",
    ),
)

# The engines' other formats (formats_beyond_two.md), entries of this one table kept in their own files:
# Hugging Face native fp8 (§2); MXFP4 (GPT-OSS), GPTQ, AWQ, CT mxfp4/mxfp8 (§1, §3-5).
from quantgate.validators.schemes_fp8 import FP8_NATIVE_SCHEMES, fp8_native_for, fp8_native_spec  # noqa: E402,F401
from quantgate.validators.schemes_beyond import BEYOND_SCHEMES  # noqa: E402 - needs the classes above

SCHEMES = SCHEMES + FP8_NATIVE_SCHEMES + BEYOND_SCHEMES
DIALECTS_WITH_SCHEMES: frozenset[str] = frozenset(s.dialect for s in SCHEMES)

_BY_KEY: dict[tuple[str, str], SchemeSpec] = {(s.dialect, s.name.upper()): s for s in SCHEMES}

# Other spellings people and configs use for the same specs (looked up case-insensitively).
ALIASES: dict[tuple[str, str], str] = {
    (MODELOPT, "W4A16_NVFP4"): "NVFP4_WEIGHT_ONLY",
    (MODELOPT, "NVFP4A16"): "NVFP4_WEIGHT_ONLY",
    (MODELOPT, "FP8_PER_CHANNEL_PER_TOKEN"): "FP8_PER_CHANNEL",
    (MODELOPT, "FP8_PC_PT"): "FP8_PER_CHANNEL",
    (COMPRESSED_TENSORS, "NVFP4-PACK-QUANTIZED"): "NVFP4",
    (COMPRESSED_TENSORS, "FLOAT-QUANTIZED"): "FP8",
    (COMPRESSED_TENSORS, "PACK-QUANTIZED"): "W4A16",
    (COMPRESSED_TENSORS, "INT-QUANTIZED"): "W8A8",
    (COMPRESSED_TENSORS, "W8A8_INT8"): "W8A8",
    (COMPRESSED_TENSORS, "INT8"): "W8A8",
    (COMPRESSED_TENSORS, "NVFP4_WEIGHT_ONLY"): "NVFP4A16",
}

# ModelOpt MIXED_PRECISION: `quantized_layers` maps module -> {"quant_algo": ...}; the algos vLLM
# accepts there (vllm_sglang.md §1, invariant 24).
MIXED_PRECISION = "MIXED_PRECISION"
MIXED_PRECISION_ALGOS: tuple[str, ...] = ("FP8", "NVFP4", "W4A16_NVFP4")

# Every tensor suffix any scheme writes, and the other per-linear quantization tensors engines know.
SCHEME_SUFFIXES: frozenset[str] = frozenset(t.suffix for s in SCHEMES for t in s.tensors)
WEIGHT_SUFFIXES: frozenset[str] = frozenset({"weight", "weight_packed"} | {s.weight_suffix for s in SCHEMES})
EXTRA_QUANT_SUFFIXES: frozenset[str] = frozenset(
    {"pre_quant_scale", "input_zero_point", "weight_scale_inv", "k_scale", "v_scale", "q_scale"}
)
KV_SCALE_SUFFIXES: frozenset[str] = frozenset({"k_scale", "v_scale", "q_scale"})

UNQUANTIZED_BITS: dict[str, int] = {"BF16": 16, "F16": 16, "F32": 32}


def scheme(dialect: str, name: str) -> SchemeSpec:
    """The spec called `name` in `dialect` (case-insensitive; aliases such as W4A16_NVFP4 accepted).

    Raises KeyError with the known names when there is none.
    """
    upper = name.upper()
    spec = _BY_KEY.get((dialect, upper)) or _BY_KEY.get((dialect, ALIASES.get((dialect, upper), "")))
    if spec is None:
        known = ", ".join(s.name for s in SCHEMES if s.dialect == dialect)
        raise KeyError(f"unknown {dialect!r} scheme {name!r}; known: {known or 'none (unknown dialect)'}")
    return spec


def scheme_for_quant_algo(quant_algo: str) -> SchemeSpec | None:
    """The ModelOpt spec for a `quant_algo` string (any case; "fp8_pb_wo" as ModelOpt writes it)."""
    upper = quant_algo.upper()
    for spec in SCHEMES:
        if spec.dialect == MODELOPT and spec.quant_algo == upper:
            return spec
    return None


def mixed_precision_schemes(
        quantized_layers: Mapping[str, Mapping[str, object]]) -> dict[str, SchemeSpec | None]:
    """Resolve a ModelOpt MIXED_PRECISION `quantized_layers` map: module -> spec (None = unknown algo)."""
    out: dict[str, SchemeSpec | None] = {}
    for module, layer_cfg in quantized_layers.items():
        algo = layer_cfg.get("quant_algo") if isinstance(layer_cfg, Mapping) else None
        spec = scheme_for_quant_algo(algo) if isinstance(algo, str) else None
        out[module] = spec if spec is not None and spec.quant_algo in MIXED_PRECISION_ALGOS else None
    return out


def expected_shapes(spec: SchemeSpec, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """suffix -> canonical stored shape for a linear of logical shape [out, in]."""
    return {t.suffix: t.shape(out_features, in_features) for t in spec.tensors}


def bits_per_weight(spec: SchemeSpec | None, unquantized_dtype: str = "BF16") -> float:
    """Storage bits per weight element including group/block scales (NVFP4 4.5, FP8 8, BF16 16)."""
    if spec is None:
        return float(UNQUANTIZED_BITS.get(unquantized_dtype, 16))
    return spec.weight_bits + spec.scale_overhead_bits


def _matches(spec: SchemeSpec, tensors: Mapping[str, TensorInfo], present: frozenset[str]) -> bool:
    if not spec.required_suffixes <= present or not present <= spec.suffixes:
        return False
    weight = tensors[spec.weight_suffix]
    if len(weight.shape) != spec.weight_ndim:
        return False
    out_features, in_features = spec.logical_from_weight(weight.shape)
    for suffix in present:
        tspec = spec.by_suffix[suffix]
        info = tensors[suffix]
        if info.dtype not in tspec.dtypes:
            return False
        if tuple(info.shape) not in tspec.accepted_shapes(out_features, in_features):
            return False
    return True


def match_scheme(dialect: str | None, suffixes: Mapping[str, TensorInfo]) -> SchemeSpec | None:
    """Identify the scheme of one module from the tensors it carries on disk.

    `suffixes` maps a module's tensor suffix ("weight", "weight_scale", ...) to its TensorInfo;
    suffixes no scheme writes (bias, k_scale ...) are ignored. A spec matches when every required
    tensor is present, nothing foreign to it is, and every dtype and shape agrees with the weight's
    logical shape. `dialect=None` searches both dialects. Returns None for unquantized modules and for
    anything malformed (so a rule can report why).
    """
    present = frozenset(s for s in suffixes if s in SCHEME_SUFFIXES)
    if not present & WEIGHT_SUFFIXES or (present <= WEIGHT_SUFFIXES and _is_unquantized(suffixes)):
        return None
    for spec in SCHEMES:
        if (dialect is None or spec.dialect == dialect) and _matches(spec, suffixes, present):
            return spec
    return None


def _is_unquantized(suffixes: Mapping[str, TensorInfo]) -> bool:
    weight = suffixes.get("weight")
    return weight is not None and weight.dtype in UNQUANTIZED_BITS


# ---- compressed-tensors config groups -> specs ----------------------------------------------------
#: float-quantized weight strategy -> the spec it stores (per-tensor static / per-channel / blocks).
CT_FLOAT_STRATEGY: dict[str, str] = {"tensor": "FP8", "channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


def ct_group_schemes(group: Mapping[str, Any], global_format: str | None) -> list[SchemeSpec]:
    """The compressed-tensors specs a config group declares: its `format` (or the config's, unless that
    is `mixed-precision`) narrowed by the weight args (bits, float strategy) and by whether static
    activation scales are stored (NVFP4 vs NVFP4A16, FP8 static vs dynamic).

    When the args narrow to nothing the format's specs are returned, so a contradiction with the
    bytes is still reported against what the format allows.
    """
    fmt = group.get("format") or (global_format if global_format != "mixed-precision" else None)
    candidates = [s for s in SCHEMES if s.dialect == COMPRESSED_TENSORS and (fmt is None or s.ct_format == fmt)]
    weights = group.get("weights") if isinstance(group.get("weights"), Mapping) else {}
    inputs = group.get("input_activations") if isinstance(group.get("input_activations"), Mapping) else None
    static_inputs = inputs is not None and inputs.get("dynamic") is False
    local_inputs = inputs is not None and inputs.get("dynamic") == "local"   # NVFP4: static global scale

    def fits(spec: SchemeSpec) -> bool:
        if weights.get("num_bits") not in (None, spec.weight_bits):
            return False
        if spec.ct_format == "float-quantized":
            return CT_FLOAT_STRATEGY.get(str(weights.get("strategy")), spec.name) == spec.name
        if spec.ct_format == "nvfp4-pack-quantized":
            return spec.activation_scales == (static_inputs or local_inputs)
        return True

    narrowed = [s for s in candidates if fits(s)]
    return narrowed or candidates
