"""Decode the raw little-endian bytes of one (small) safetensors tensor into float64 with numpy.

Used only by the deep checks (`CheckpointView.read_values`), which read scale tensors; numpy is
imported lazily so header-only validation never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from quantgate.validators.errors import CheckpointReadError

if TYPE_CHECKING:
    import numpy as np

# Plain little-endian numpy dtypes by safetensors name.
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "?", "U8": "<u1", "I8": "<i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
    "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8",
}

E4M3_EXP_BIAS = 7          # float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits, no inf
E4M3_NAN_BITS = 0x7F       # S.1111.111 is NaN (both signs)
E8M0_NAN_BITS = 0xFF       # float8_e8m0fnu: 2^(e - 127), 0xFF NaN
E8M0_EXP_BIAS = 127
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # FP4 E2M1 code & 0b111; bit 3 is the sign


@cache
def e4m3fn_table() -> np.ndarray:
    """float64 value of each of the 256 float8_e4m3fn bit patterns."""
    import numpy as np

    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - E4M3_EXP_BIAS)
    subnormal = (mantissa / 8.0) * np.exp2(1 - E4M3_EXP_BIAS)
    table = sign * np.where(exponent == 0, subnormal, normal)
    table[(codes & 0x7F) == E4M3_NAN_BITS] = np.nan
    table.flags.writeable = False       # shared by every caller (cached)
    return table


def _decode_plain(raw: bytes, dtype: str) -> np.ndarray:
    import numpy as np

    return np.frombuffer(raw, dtype=NUMPY_DTYPES[dtype]).astype(np.float64)


def _decode_bf16(raw: bytes) -> np.ndarray:
    import numpy as np

    # bfloat16 is the top half of a float32: widen the bits and reinterpret.
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _decode_e4m3(raw: bytes) -> np.ndarray:
    import numpy as np

    return e4m3fn_table()[np.frombuffer(raw, dtype=np.uint8)]


def _decode_e5m2(raw: bytes) -> np.ndarray:
    import numpy as np

    # float8_e5m2 is the top byte of a float16 (same exponent width and bias).
    return (np.frombuffer(raw, dtype=np.uint8).astype(np.uint16) << 8).view(np.float16).astype(np.float64)


def _decode_e8m0(raw: bytes) -> np.ndarray:
    import numpy as np

    codes = np.frombuffer(raw, dtype=np.uint8)
    values = np.exp2(codes.astype(np.float64) - E8M0_EXP_BIAS)
    values[codes == E8M0_NAN_BITS] = np.nan
    return values


def _decode_f4(raw: bytes) -> np.ndarray:
    import numpy as np

    packed = np.frombuffer(raw, dtype=np.uint8)
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)   # element 0 in the low nibble
    magnitude = np.asarray(E2M1_MAGNITUDES)[codes & 0x7]
    return np.where(codes & 0x8, -magnitude, magnitude)


DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    **{name: (lambda raw, name=name: _decode_plain(raw, name)) for name in NUMPY_DTYPES},
    "BF16": _decode_bf16,
    "F8_E4M3": _decode_e4m3,
    "F8_E5M2": _decode_e5m2,
    "F8_E8M0": _decode_e8m0,
    "F4": _decode_f4,
}


def decode_values(raw: bytes, dtype: str, shape: tuple[int, ...], *, label: str = "tensor") -> np.ndarray:
    """float64 array of `shape` from the raw bytes of a tensor stored as `dtype`."""
    decoder = DECODERS.get(dtype)
    if decoder is None:
        raise CheckpointReadError(f"{label}: cannot decode {dtype} values (supported: {', '.join(DECODERS)})")
    return decoder(raw).reshape(shape)
