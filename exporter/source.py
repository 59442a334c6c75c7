"""The checkpoint being quantized: a local directory / file or a Hub repo, read one tensor at a time.

Reads go straight from the file with positioned reads into a fresh buffer (no mmap), so the resident
set of a weight pass stays at the tensors in flight whatever the model size; the page cache is the
only cache. Fused 3-D experts are sliced per expert on the fly: only that expert's bytes are read.
Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused: loading them executes code.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantgate.exporter.source_checks import (  # noqa: F401 - torch-free checks, re-exported here
    DECODER_KINDS,
    PICKLE_SUFFIXES,
    check_supported,
    inspect_checkpoint,
    no_such_source,
    refuse_pickle_only,
)
from quantgate.validators.checkpoint import CheckpointView
from quantgate.validators.errors import CheckpointReadError
from quantgate.validators.layout import FusedSlice, Layout, Module
from quantgate.validators.safetensors_header import TensorInfo

log = logging.getLogger(__name__)

#: safetensors dtype string -> torch dtype (what we can read back).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
#: What a Hub download fetches: weights, configs, tokenizer and processor files, chat templates.
HUB_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                                 "*.jinja", "chat_template*")
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class Source:
    """A readable source checkpoint with its layout. Use `open_source` to build one."""

    view: CheckpointView
    layout: Layout
    path: Path
    _data_offsets: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict:
        return self.view.config or {}

    @property
    def architecture(self) -> str | None:
        return self.layout.architecture

    @property
    def tied_embeddings(self) -> bool:
        """`tie_word_embeddings` of the config (text sub-config for multimodal wrappers)."""
        cfg = self.config
        tied = cfg.get("tie_word_embeddings")
        if tied is None:
            tied = (cfg.get("text_config") or {}).get("tie_word_embeddings", True)
        return bool(tied)

    # -- reading -------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.view.tensors[name]
        except KeyError:
            raise CheckpointReadError(f"{self.path}: tensor {name!r} is not in the checkpoint") from None

    def tensor(self, name: str, *, pin: bool = False) -> torch.Tensor:
        """The whole tensor `name`, read from disk now (nothing is cached); `pin`: into page-locked
        memory, so a CUDA copy of it can run asynchronously."""
        info = self.info(name)
        return self._read(info, *self.span(name)[1:], pin).reshape(info.shape)

    def expert_tensor(self, name: str, expert: int, *, pin: bool = False) -> torch.Tensor:
        """`tensor(name)[expert]` for a 3-D fused tensor, reading only that expert's bytes."""
        info = self.info(name)
        return self._read(info, *self.span(name, expert)[1:], pin).reshape(info.shape[1:])

    def span(self, name: str, expert: int | None = None) -> tuple[Path, int, int]:
        """(file, byte offset in it, length) of tensor `name`, or of one expert of a fused 3-D tensor."""
        info = self.info(name)
        offset = self._data_offset(info.file) + info.start
        length = info.end - info.start
        if expert is not None:
            if len(info.shape) != 3 or not 0 <= expert < info.shape[0]:
                raise CheckpointReadError(f"{self.path}: cannot take expert {expert} of {name} {list(info.shape)}")
            length //= info.shape[0]
            offset += expert * length
        return self.path / info.file, offset, length

    def torch_dtype(self, name: str) -> torch.dtype:
        """The torch dtype tensor `name` is read as; a dtype torch cannot hold is a clear error."""
        info = self.info(name)
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointReadError(f"{self.path}: tensor {info.name} has dtype {info.dtype}, which cannot be read")
        return dtype

    def module_weight(self, module: Module) -> torch.Tensor:
        """The module's weight as a Linear stores it, [out, in]; fused experts sliced per expert."""
        if module.fused is not None:
            return slice_fused(self.expert_tensor(module.fused.tensor, module.fused.expert), module.fused)
        if "weight" not in module.tensors:
            raise CheckpointReadError(f"{self.path}: module {module.name} has no weight tensor")
        return self.tensor(module.tensors["weight"].name)

    def _read(self, info: TensorInfo, offset: int, length: int, pin: bool = False) -> torch.Tensor:
        """`length` bytes at `offset` of `info`'s file (a `span`), as `info`'s dtype."""
        dtype = self.torch_dtype(info.name)
        file = self.path / info.file
        buf = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        with open(file, "rb", buffering=0) as fh:
            fh.seek(offset)
            view = memoryview(buf.numpy())
            got = 0
            while got < length:
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointReadError(f"{file}: truncated while reading {info.name}")
                got += n
        return buf.view(dtype)

    def _data_offset(self, file: str) -> int:
        if file not in self._data_offsets:
            with open(self.path / file, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
            self._data_offsets[file] = 8 + header_len
        return self._data_offsets[file]

    def other_files(self) -> list[str]:
        """Non-weight files to copy into the export (tokenizer, generation config, processor ...)."""
        return [f for f in self.view.other_files() if (self.path / f).is_file()]


def slice_fused(expert: torch.Tensor, fused: FusedSlice) -> torch.Tensor:
    """One expert's matrix of a fused tensor -> the [out, in] matrix of the virtual module.

    expert: [out_total, in] normally, [in, out_total] when `fused.transposed`; `interleaved`
    (GPT-OSS) stores gate at columns 0::2 and up at 1::2 of the out dim instead of two halves.
    """
    matrix = expert.t() if fused.transposed else expert
    if fused.rows is not None:
        start, stop = fused.rows
        if fused.interleaved:
            half = start // (stop - start)          # 0 for gate, 1 for up
            matrix = matrix[half::2]
        else:
            matrix = matrix[start:stop]
    return matrix.contiguous()


def open_source(source: str, revision: str | None = None, token: str | None = None, *,
                refuse_quantized: bool = False) -> Source:
    """Open a local directory / `.safetensors` file or a Hub repo id and build its layout.

    Raises CheckpointReadError (unreadable, pickle-only, missing) or UnsupportedArchitectureError
    (the layout cannot place the model's modules), both with an actionable message.
    `refuse_quantized` (a source to quantize): AlreadyQuantizedError for a quantized checkpoint,
    decided from its config and headers before the layout is built (exporter.quantized_source).
    """
    path = _resolve(source, revision, token)
    view, layout = inspect_checkpoint(path, source, refuse_quantized=refuse_quantized)
    root = path if path.is_dir() else path.parent
    return Source(view=view, layout=layout, path=root)


def _resolve(source: str, revision: str | None, token: str | None) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if source.startswith(("/", ".", "~")) or not _HUB_ID.match(source):
        raise no_such_source(source)
    return download_hub(source, revision=revision, token=token)


def download_hub(repo: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Download safetensors + JSON + tokenizer files of `repo` into the HF cache (HF_HOME, HF_TOKEN,
    HF_ENDPOINT and HF_HUB_OFFLINE are honoured by huggingface_hub) and return the snapshot path."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = repo.removeprefix("hf://")
    if "@" in repo and revision is None:
        repo, revision = repo.split("@", 1)
    try:
        local = snapshot_download(repo, revision=revision, token=token, allow_patterns=list(HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise CheckpointReadError(f"{repo}: Hub repo not found (check the name, or set HF_TOKEN for a gated/"
                                  "private repo)") from None
    except LocalEntryNotFoundError:
        raise CheckpointReadError(f"{repo}: not in the local HF cache and the Hub is unreachable or "
                                  "HF_HUB_OFFLINE is set") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointReadError(f"{repo}: download failed: {str(exc).splitlines()[0]}") from None
    path = Path(local)
    if not any(path.glob("*.safetensors")):
        raise CheckpointReadError(f"{repo}: the repo has no .safetensors weights; quantgate never loads pickle "
                                  "(.bin/.pt) checkpoints. Convert it to safetensors first.")
    return path

