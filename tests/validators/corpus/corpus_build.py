"""Builder of the bug-report corpus: tiny real checkpoints from a few lines of spec.

A case (corpus_cases.py) names an architecture template (real tensor names and relative structure of
the released model, tiny dims), the format each kind of module is stored in, the producer's
quantization config, and optional mutations. This module turns that into real files: safetensors
shards (header + data; weights are zeros, scale tensors hold real, plausible values because the
validator's scale rules read them), `config.json`, `hf_quant_config.json` / `quantize_config.json`
as the producer writes them, and an index when sharded.

Only numpy: every dtype (BF16, F8_E4M3, E8M0-as-U8 ...) is encoded here byte by byte, so the test
needs neither torch nor a GPU. The files are checked to open with the `safetensors` package itself
(test_corpus.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: (dtype, shape, fill): fill None writes zeros; a number fills every element; a list is the data.
Spec = tuple[str, tuple[int, ...], "float | int | list | None"]

ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "U8": 1, "I8": 1, "I32": 4, "I64": 8}


# ---- safetensors writer ---------------------------------------------------------------------------
def _e4m3_code(value: float) -> int:
    """Nearest float8_e4m3fn bit pattern (positive finite values; what block scales hold)."""
    best, best_err = 0, float("inf")
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        if abs(v - value) < best_err:
            best, best_err = code, abs(v - value)
    return best


def encode(spec: Spec) -> bytes:
    dtype, shape, fill = spec
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if fill is None:
        return bytes(n * ITEM_BYTES[dtype])
    data = np.asarray(fill, dtype=np.float64)
    data = np.broadcast_to(data, (n,)) if data.size == 1 else data.reshape(n)
    if dtype == "BF16":
        return (data.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    if dtype == "F8_E4M3":
        return bytes(_e4m3_code(float(v)) for v in data)
    numpy_dtype = {
        "F16": "<f2",
        "F32": "<f4",
        "F64": "<f8",
        "U8": "<u1",
        "I8": "<i1",
        "I32": "<i4",
        "I64": "<i8",
    }
    return data.astype(numpy_dtype[dtype]).tobytes()


def write_safetensors(path: Path, tensors: dict[str, Spec]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        raw = encode(tensors[name])
        header[name] = {
            "dtype": tensors[name][0],
            "shape": list(tensors[name][1]),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


# ---- the model skeleton templates fill -----------------------------------------------------------------------
@dataclass
class Linear:
    name: str
    out: int
    inp: int
    kind: str  # attn | dense | expert | shared | router | lm_head | linear_attn


@dataclass
class Experts:
    """One MoE layer's routed experts, before a format decides how they are stored."""

    prefix: str  # "model.layers.1.mlp.experts"
    num: int
    inter: int
    hidden: int
    projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down names
    fused: str | None = (
        None  # HF storage when BF16: "gemma4" [E,2I,H]/[E,H,I], "gpt_oss" [E,H,2I]/[E,I,H]+bias
    )


@dataclass
class Model:
    arch: str
    config: dict
    linears: list[Linear]
    experts: list[Experts]
    extras: dict[str, Spec] = field(default_factory=dict)  # norms, embeddings, biases, buffers

    def names(self, kind: str) -> list[str]:
        return [lin.name for lin in self.linears if lin.kind == kind]


def expert_linears(e: Experts) -> Iterable[Linear]:
    gate, up, down = e.projs
    for i in range(e.num):
        yield Linear(f"{e.prefix}.{i}.{gate}", e.inter, e.hidden, "expert")
        yield Linear(f"{e.prefix}.{i}.{up}", e.inter, e.hidden, "expert")
        yield Linear(f"{e.prefix}.{i}.{down}", e.hidden, e.inter, "expert")
