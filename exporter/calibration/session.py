"""One transformers model per job: loaded at most once, shared by `auto` scoring and calibration.

`ModelSession(model_ref, ...)` loads nothing until `model()` is first called (a job that reuses a
scores file and activation stats never instantiates the model); the tokenizer is loaded only for
text calibration data, once (so its warnings appear once). The pipeline releases the session when
calibration ends; the weight pass never needs the model (it reads the checkpoint, alongside
calibration on CUDA: exporter.overlap).

Scoring runs backward passes and perturbs weights in place; `check_untouched` is the cheap guard
that it handed the model back as calibration expects it: eval mode, no gradient kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantgate.exporter.calibration.data import RANDOM, CalibrationBatches, calibration_batches
from quantgate.exporter.calibration import model as calib_model
from quantgate.exporter.calibration.model import DEFAULT_DTYPE, load_tokenizer
from quantgate.exporter.calibration.stats import CalibrationError

logger = logging.getLogger(__name__)

_UNSET: Any = object()


class ModelSession:
    """The calibration model of `model_ref` (and its tokenizer), each loaded at most once."""

    def __init__(
        self,
        model_ref: str,
        *,
        device: str = "auto",
        dtype: torch.dtype = DEFAULT_DTYPE,
        token: str | None = None,
        revision: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.model_ref = model_ref
        self.device = device
        self.dtype = dtype
        self.token = token
        self.revision = revision
        self._model = model
        self._tokenizer: Any = _UNSET
        self.loads = 0              # how many times this session loaded the model (0 or 1)
        self.load_seconds = 0.0      # from_pretrained, after...
        self.import_seconds = 0.0    # ...transformers' first-use imports (calib_model.import_transformers)
        self._imported = False

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def model(self) -> nn.Module:
        """The model, loaded on first use (bf16; `device_map="auto"` on CUDA, CPU otherwise); the
        transformers imports it needs first are timed apart (`import_seconds`)."""
        if self._model is None:
            self.import_transformers()
            start = time.perf_counter()
            self._model = calib_model.load_calibration_model(   # looked up per call: patchable
                self.model_ref, device=self.device, dtype=self.dtype, token=self.token, revision=self.revision
            )
            self.load_seconds = time.perf_counter() - start
            self.loads += 1
        return self._model

    def import_transformers(self) -> None:
        """transformers' first-use imports, once, timed (`import_seconds`); `model()` does this first."""
        if not self._imported:
            self.import_seconds = calib_model.import_transformers()
            self._imported = True

    def tokenizer(self) -> Any | None:
        """The model's tokenizer or None (see `calib_model.load_tokenizer`), looked up once."""
        if self._tokenizer is _UNSET:
            vocab = self.model().get_input_embeddings().num_embeddings
            self._tokenizer = load_tokenizer(self.model_ref, self.token, self.revision, vocab_size=vocab)
        return self._tokenizer

    def batches(
        self, data: str, *, samples: int, seq_len: int, batch_size: int, seed: int = 0
    ) -> CalibrationBatches:
        """Token batches of `data` for this model; `random` never touches the tokenizer."""
        model = self.model()
        return calibration_batches(
            data,
            tokenizer=None if data == RANDOM else self.tokenizer(),
            config=model.config,
            vocab_size=model.get_input_embeddings().num_embeddings,
            samples=samples,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            token=self.token,
        )

    def release(self) -> None:
        """Drop the model and tokenizer (the weight pass needs neither); a later `model()` reloads."""
        if self._model is None:
            return
        on_cuda = any(p.is_cuda for p in self._model.parameters())
        self._model = None
        self._tokenizer = _UNSET
        if on_cuda:
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class ModelState:
    """What scoring must hand back unchanged: the training flag and every `requires_grad`."""

    training: bool
    requires_grad: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        return cls(model.training, {n: p.requires_grad for n, p in model.named_parameters()})


def check_untouched(model: nn.Module, before: ModelState) -> None:
    """CalibrationError unless `model` is in the mode and `requires_grad` state of `before` and keeps
    no gradient: what a scoring pass must leave behind for calibration to run on the same model.
    (Weights restored to their bytes is proven by the tests; hashing every weight here would cost
    a pass over the model.)"""
    problems = []
    if model.training != before.training:
        problems.append(f"training mode changed to {model.training}")
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    if with_grad:
        problems.append(f"{len(with_grad)} parameter(s) keep a gradient ({with_grad[0]} ...)")
    changed = [n for n, p in model.named_parameters() if p.requires_grad != before.requires_grad.get(n)]
    if changed:
        problems.append(f"requires_grad changed on {len(changed)} parameter(s) ({changed[0]} ...)")
    if problems:
        raise CalibrationError("scoring did not hand the model back as it found it: " + "; ".join(problems))
