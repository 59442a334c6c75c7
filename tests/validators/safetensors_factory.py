"""Test helpers: real safetensors checkpoints (written by the `safetensors` package) and raw files.

Imported by the validator I/O tests as a top-level module (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save_file

if TYPE_CHECKING:
    from typing import Self

INDEX_FILE = "model.safetensors.index.json"


def tiny_tensors(seed: int = 0, layers: int = 2) -> dict[str, np.ndarray]:
    """A small ModelOpt-NVFP4-looking tensor set of mixed dtypes (values are random)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float16)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        tensors[f"{p}.input_layernorm.weight"] = np.ones(16, dtype=np.float32)
        for proj in ("q_proj", "o_proj"):
            tensors[f"{p}.self_attn.{proj}.weight"] = rng.integers(0, 255, (16, 8), dtype=np.uint8)
            tensors[f"{p}.self_attn.{proj}.weight_scale"] = rng.integers(0, 127, (16, 1), dtype=np.uint8)
            tensors[f"{p}.self_attn.{proj}.weight_scale_2"] = np.array(rng.random() * 1e-3, dtype=np.float32)
            tensors[f"{p}.self_attn.{proj}.input_scale"] = np.array(rng.random() * 1e-2, dtype=np.float32)
        tensors[f"{p}.mlp.gate.weight"] = rng.standard_normal((4, 16)).astype(np.float32)
    tensors["lm_head.weight"] = rng.standard_normal((32, 16)).astype(np.float64)
    tensors["position_ids"] = np.arange(8, dtype=np.int64)
    return tensors


def write_checkpoint(out: Path, tensors: Mapping[str, np.ndarray], *, shards: int = 2, index: bool = True,
                     config: dict | None = None) -> dict[str, str]:
    """Write `tensors` as `shards` safetensors files (+ index, + config.json); return the weight_map."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i::shards]
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if index:
        write_index(out, weight_map)
    (out / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"],
                                                           "model_type": "llama"}))
    return weight_map


def write_index(out: Path, weight_map: Mapping[str, object]) -> None:
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": dict(weight_map)},
                                             indent=2))


def raw_file(path: Path, header: object | bytes, data: bytes | int = 0, *, length: int | None = None) -> Path:
    """A hand-made safetensors file: `<u64 length><header JSON (or raw bytes)><data>`.

    `data` is bytes, or a byte count of zeros; `length` overrides the declared header length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = data if isinstance(data, bytes) else bytes(data)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


class CountingFile:
    """A binary file wrapper that records the size of every read (to prove what was read)."""

    def __init__(self, path: str | Path, mode: str, reads: list[int]) -> None:
        self._f = open(path, mode)  # noqa: SIM115 - closed by __exit__
        self._reads = reads

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._reads.append(len(data))
        return data

    def readinto(self, buffer: bytearray) -> int:
        n = self._f.readinto(buffer)
        self._reads.append(n)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def fileno(self) -> int:
        return self._f.fileno()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
