"""Scheme-table entries for the engines' formats beyond ModelOpt and compressed-tensors.

Part of the single scheme table (`quantgate.validators.schemes.SCHEMES` appends `BEYOND_SCHEMES`); kept in
its own file so schemes.py stays small. Sources: reference formats_beyond_two.md §1, §3-5 and
llmcompressor_and_services.md §A2.

- `mxfp4` (GPT-OSS): per expert, `<proj>_blocks` U8 [out, in/32, 16] (two E2M1 codes per byte) and
  `<proj>_scales` U8 [out, in/32] holding E8M0 exponents; stored fused per MoE layer with a leading
  expert dim (vLLM `mxfp4.py` `Mxfp4MoEMethod.create_weights`, `gpt_oss.py::_load_weights_mxfp4`).
- compressed-tensors `mxfp4-pack-quantized` / `mxfp8-quantized` (CT `MXFP4PackedCompressor`).
- `gptq` (AutoGPTQ / GPTQModel): `qweight` I32 [in*bits/32, out], `qzeros` I32 [in/g, out*bits/32],
  `scales` F16 [in/g, out], `g_idx` I32 [in] (vLLM `gptq_marlin.py::GPTQMarlinLinearMethod`).
- `awq` (AutoAWQ): `qweight` I32 [in, out/8], `qzeros` I32 [in/g, out/8], `scales` F16 [in/g, out]
  (vLLM `awq_marlin.py::AWQMarlinLinearMethod`).

Group sizes: the canonical shape uses group 128; the other group sizes GPTQ/AWQ exporters write
(and -1, one group over the whole input: [1, out]) are accepted shapes. Whether the stored group
matches the config's `group_size` is rule QG340's business (validators/rules/wna16_tensors.py).
"""

from __future__ import annotations

from quantgate.validators.schemes import (  # import this module only through validators.schemes (cycle)
    AWQ,
    COMPRESSED_TENSORS,
    GPTQ,
    MXFP4,
    FP4_PER_BYTE,
    MX_BLOCK,
    SchemeSpec,
    ShapeFn,
    TensorSpec,
)

BEYOND_DIALECTS: tuple[str, ...] = (MXFP4, GPTQ, AWQ)

MXFP4_BYTES_PER_BLOCK = MX_BLOCK // FP4_PER_BYTE  # 16 bytes hold one 32-element block
INT32_BITS = 32
WNA16_GROUP = 128  # canonical group size (the shape the table writes first)
#: other group sizes GPTQ/AWQ exporters write; -1 is one group over the whole input dim
WNA16_ALT_GROUPS: tuple[int, ...] = (32, 64, 256, 512, 1024, 16, -1)
WNA16_SCALE_DTYPES: tuple[str, ...] = ("F16", "BF16")  # vLLM copies into params_dtype


def groups(in_: int, group: int) -> int:
    """Number of scale rows for `in_` inputs at `group` (-1: one group)."""
    return 1 if group == -1 else in_ // group


# ---- MXFP4 ---------------------------------------------------------------------------------------
def _mx_blocks(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_ // MX_BLOCK, MXFP4_BYTES_PER_BLOCK)


def _mx_scales(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_ // MX_BLOCK)


def _packed_fp4(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_ // FP4_PER_BYTE)


def _full(out: int, in_: int) -> tuple[int, ...]:
    return (out, in_)


# ---- GPTQ / AWQ (shape functions per pack factor and group) ---------------------------------------
def _gptq_qweight(pack: int) -> ShapeFn:
    def shape(out: int, in_: int) -> tuple[int, ...]:
        return (in_ // pack, out)  # packed along the input dim, stored [in, out]

    shape.__name__ = f"gptq_qweight_{pack}"
    return shape


def _awq_qweight(out: int, in_: int) -> tuple[int, ...]:
    return (in_, out // 8)  # packed along the output dim


def _qzeros(pack: int, group: int) -> ShapeFn:
    def shape(out: int, in_: int) -> tuple[int, ...]:
        return (groups(in_, group), out // pack)

    shape.__name__ = f"qzeros_{pack}_{group}"
    return shape


def _scales(group: int) -> ShapeFn:
    def shape(out: int, in_: int) -> tuple[int, ...]:
        return (groups(in_, group), out)

    shape.__name__ = f"scales_{group}"
    return shape


def _g_idx(out: int, in_: int) -> tuple[int, ...]:
    return (in_,)


def _group_specs(pack: int) -> tuple[TensorSpec, TensorSpec]:
    qzeros = TensorSpec("qzeros", ("I32",), _qzeros(pack, WNA16_GROUP),
                        alt_shapes=tuple(_qzeros(pack, g) for g in WNA16_ALT_GROUPS))
    scales = TensorSpec("scales", WNA16_SCALE_DTYPES, _scales(WNA16_GROUP),
                        alt_shapes=tuple(_scales(g) for g in WNA16_ALT_GROUPS))
    return qzeros, scales


def _gptq(bits: int) -> SchemeSpec:
    pack = INT32_BITS // bits
    qzeros, scales = _group_specs(pack)
    return SchemeSpec(
        f"GPTQ_INT{bits}", GPTQ, None,
        (TensorSpec("qweight", ("I32",), _gptq_qweight(pack)), qzeros, scales,
         TensorSpec("g_idx", ("I32",), _g_idx, required=False)),
        weight_bits=bits, group_size=WNA16_GROUP, scale_overhead_bits=16 / WNA16_GROUP,
        logical_shape=lambda s, pack=pack: (s[1], s[0] * pack),
        description=f"GPTQ int{bits}: qweight [in/{pack}, out], group scales/zeros, optional g_idx (desc_act)",
    )


SPECS: tuple[SchemeSpec, ...] = (
    SchemeSpec(
        "MXFP4", MXFP4, None,
        (TensorSpec("blocks", ("U8",), _mx_blocks), TensorSpec("scales", ("U8",), _mx_scales)),
        weight_bits=4, in_divisor=MX_BLOCK, in_pack=FP4_PER_BYTE, group_size=MX_BLOCK,
        scale_overhead_bits=8 / MX_BLOCK, weight_ndim=3,
        description="GPT-OSS MXFP4 experts: E2M1 blocks [out, in/32, 16] + E8M0 scales [out, in/32], fused per layer",
    ),
    SchemeSpec(
        "MXFP4", COMPRESSED_TENSORS, None,
        (TensorSpec("weight_packed", ("U8",), _packed_fp4), TensorSpec("weight_scale", ("U8",), _mx_scales)),
        weight_bits=4, in_divisor=MX_BLOCK, ct_format="mxfp4-pack-quantized", in_pack=FP4_PER_BYTE,
        group_size=MX_BLOCK, scale_overhead_bits=8 / MX_BLOCK,
        description="mxfp4-pack-quantized: E2M1 weight_packed [out, in/2] + E8M0 weight_scale [out, in/32]",
    ),
    SchemeSpec(
        "MXFP8", COMPRESSED_TENSORS, None,
        (TensorSpec("weight", ("F8_E4M3",), _full), TensorSpec("weight_scale", ("U8",), _mx_scales)),
        weight_bits=8, in_divisor=MX_BLOCK, ct_format="mxfp8-quantized", group_size=MX_BLOCK,
        scale_overhead_bits=8 / MX_BLOCK,
        description="mxfp8-quantized: e4m3 weight + E8M0 weight_scale [out, in/32]",
    ),
    _gptq(4),
    _gptq(8),
    SchemeSpec(
        "AWQ_INT4", AWQ, None,
        (TensorSpec("qweight", ("I32",), _awq_qweight), *_group_specs(8)),
        weight_bits=4, group_size=WNA16_GROUP, scale_overhead_bits=16 / WNA16_GROUP,
        logical_shape=lambda s: (s[1] * 8, s[0]),
        description="AWQ int4 (GEMM): qweight [in, out/8], qzeros [in/g, out/8], scales [in/g, out]",
    ),
)

BEYOND_SCHEMES: tuple[SchemeSpec, ...] = SPECS
