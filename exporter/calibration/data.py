"""Calibration data: token batches from `random`, a `.jsonl` / `.txt` file, or a Hub dataset.

Text is tokenized with the model's own tokenizer and packed into `samples x seq_len` token ids
(documents joined by the EOS token), then split into batches. `random` needs no tokenizer: seeded
uniform ids over the vocabulary, never a special or multimodal placeholder id (an image token
without pixels would break a multimodal model's forward).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from quantgate.validators.errors import UsageError

logger = logging.getLogger(__name__)

RANDOM = "random"
TEXT_FIELD = "text"
TEXT_BLOCK_CHARS = 1 << 20  # .txt files are tokenized in blocks of this many characters
HUB_DATASET = re.compile(r"^(?:hf://datasets/)?(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<split>[\w.-]+))?$")
_TOKEN_ID_KEY = re.compile(r"token_(?:id|ids|index)$")


class CalibrationDataError(UsageError):
    """The calibration data cannot be used (missing file, bad line, no tokenizer ...): CLI exit 2."""


@dataclass(frozen=True)
class CalibrationBatches:
    """Packed token ids, ready to feed: `batches` are [b, seq_len] int64 tensors."""

    batches: list[Tensor]
    source: str  # "random" | "jsonl:<path>" | "txt:<path>" | "hub:<repo>"
    samples: int
    seq_len: int

    @property
    def total_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def special_token_ids(tokenizer: Any | None, config: Any | None) -> set[int]:
    """Ids never to sample: the tokenizer's specials and every `*_token_id/_index` of the config tree."""
    ids: set[int] = set(getattr(tokenizer, "all_special_ids", None) or [])
    stack = [config.to_dict()] if config is not None and hasattr(config, "to_dict") else []
    while stack:
        node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(key, str) and _TOKEN_ID_KEY.search(key):
                values = value if isinstance(value, (list, tuple)) else [value]
                ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    return ids


def random_tokens(
    vocab_size: int, samples: int, seq_len: int, *, exclude: Iterable[int] = (), seed: int = 0
) -> Tensor:
    """Seeded uniform token ids [samples, seq_len] over range(vocab_size) minus `exclude`."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    excluded = [i for i in exclude if 0 <= i < vocab_size]
    if excluded:
        allowed[torch.tensor(excluded)] = False
    pool = torch.nonzero(allowed).flatten()
    if pool.numel() == 0:
        raise CalibrationDataError(f"no usable token ids: all {vocab_size} ids are special tokens")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, pool.numel(), (samples, seq_len), generator=generator)
    return pool[picks]


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be an object like "
                    f'{{"{TEXT_FIELD}": "..."}}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_FIELD), str):
                raise CalibrationDataError(
                    f"{path}:{lineno}: expected an object with a string field {TEXT_FIELD!r}, got "
                    f"{type(record).__name__}"
                    + (f" with keys {sorted(record)[:5]}" if isinstance(record, dict) else "")
                )
            yield record[TEXT_FIELD]


def _txt_blocks(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        while block := fh.read(TEXT_BLOCK_CHARS):
            yield block


def _hub_texts(repo: str, split: str, token: str | None) -> Iterator[str]:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CalibrationDataError(
            f"calibration data {repo!r} looks like a Hub dataset, which needs the 'datasets' package: "
            "pip install datasets (or pass a local .jsonl / .txt file, or 'random')"
        ) from None
    try:
        stream = datasets.load_dataset(repo, split=split, streaming=True, token=token)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; report them uniformly
        raise CalibrationDataError(f"cannot load Hub dataset {repo!r} (split {split!r}): {exc}") from None
    for row in stream:
        text = row.get(TEXT_FIELD)
        if not isinstance(text, str):
            raise CalibrationDataError(
                f"Hub dataset {repo!r} has no string column {TEXT_FIELD!r} (columns: {sorted(row)[:8]})"
            )
        yield text


def _pack(
    texts: Iterable[str], tokenizer: Any, samples: int, seq_len: int, *, docs: bool, origin: str
) -> Tensor:
    """Tokenize until samples*seq_len ids are collected; documents are joined with EOS."""
    need = samples * seq_len
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=docs)["input_ids"]
        ids.extend(encoded)
        if docs and eos is not None and (not encoded or encoded[-1] != eos):
            ids.append(eos)
        if len(ids) >= need:
            break
    if not ids:
        raise CalibrationDataError(f"{origin}: no text to calibrate on")
    usable = min(samples, len(ids) // seq_len)
    if usable == 0:
        logger.warning(
            "%s: only %d tokens, fewer than one sample of %d; using one sample of %d tokens",
            origin,
            len(ids),
            seq_len,
            len(ids),
        )
        return torch.tensor(ids, dtype=torch.int64).unsqueeze(0)
    if usable < samples:
        logger.warning(
            "%s: %d tokens are enough for %d of the %d requested samples of %d tokens",
            origin,
            len(ids),
            usable,
            samples,
            seq_len,
        )
    return torch.tensor(ids[: usable * seq_len], dtype=torch.int64).view(usable, seq_len)


def load_tokens(
    data: str,
    *,
    tokenizer: Any | None,
    vocab_size: int,
    samples: int,
    seq_len: int,
    exclude_ids: Iterable[int] = (),
    seed: int = 0,
    token: str | None = None,
) -> tuple[Tensor, str]:
    """Token ids [samples', seq_len'] and a source descriptor for `data` (see the module docstring)."""
    if samples < 1 or seq_len < 1:
        raise CalibrationDataError(
            f"calibration needs samples >= 1 and seq_len >= 1 (got {samples}, {seq_len})"
        )
    if data == RANDOM:
        return random_tokens(vocab_size, samples, seq_len, exclude=exclude_ids, seed=seed), RANDOM
    path = Path(data).expanduser()
    kind = path.suffix.lower()
    if path.is_file() and kind not in (".jsonl", ".txt"):
        raise CalibrationDataError(
            f"unsupported calibration data file {path}: use a .jsonl file (field "
            f"{TEXT_FIELD!r}) or a .txt file, a Hub dataset id, or 'random'"
        )
    hub = None if path.exists() or kind in (".jsonl", ".txt") else HUB_DATASET.match(data)
    if not path.exists() and hub is None:
        raise CalibrationDataError(
            f"calibration data {data!r} not found: give 'random', an existing .jsonl / "
            ".txt file, or a Hub dataset id (org/name[:split])"
        )
    if tokenizer is None:
        raise CalibrationDataError(
            f"calibration data {data!r} is text, but the model has no tokenizer; add the "
            "tokenizer files to the model directory or use --calib-data random"
        )
    if hub is not None:
        origin = f"hub:{hub['repo']}"
        texts, docs = _hub_texts(hub["repo"], hub["split"] or "train", token), True
    elif kind == ".jsonl":
        origin, texts, docs = f"jsonl:{path}", _jsonl_texts(path), True
    else:
        origin, texts, docs = f"txt:{path}", _txt_blocks(path), False
    try:
        return _pack(texts, tokenizer, samples, seq_len, docs=docs, origin=origin), origin
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def make_batches(tokens: Tensor, batch_size: int) -> list[Tensor]:
    """Split [N, L] ids into [<=batch_size, L] batches."""
    if batch_size < 1:
        raise CalibrationDataError(f"calibration batch size must be >= 1 (got {batch_size})")
    return list(tokens.split(batch_size))


def calibration_batches(
    data: str,
    *,
    tokenizer: Any | None,
    config: Any | None,
    vocab_size: int,
    samples: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    token: str | None = None,
) -> CalibrationBatches:
    """Everything above in one call, as `calibrate` uses it.

    `random` never consults the tokenizer: ids cover the model's `vocab_size` embedding rows minus
    the config's special / placeholder ids, so a model without (or with a broken) tokenizer calibrates.
    """
    if data == RANDOM:
        tokenizer = None
    tokens, origin = load_tokens(
        data,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        samples=samples,
        seq_len=seq_len,
        exclude_ids=special_token_ids(tokenizer, config),
        seed=seed,
        token=token,
    )
    return CalibrationBatches(make_batches(tokens, batch_size), origin, tokens.shape[0], tokens.shape[1])
