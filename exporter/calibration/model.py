"""Loading the transformers model and tokenizer for calibration, and how to feed the model.

The class is the one the checkpoint's `architectures` names (a ConditionalGeneration wrapper stays a
wrapper, so runtime module names match the on-disk names), else AutoModelForCausalLM /
AutoModelForImageTextToText; never remote code. bf16; `device_map="auto"` on CUDA, CPU otherwise.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantgate.validators.errors import CheckpointReadError, UnsupportedArchitectureError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_DTYPE = torch.bfloat16


def forward_kwargs(model: nn.Module, *, all_logits: bool = False) -> dict[str, Any]:
    """use_cache off; only the last position's logits unless the output head itself is observed."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params and not all_logits:
        kwargs["logits_to_keep"] = 1
    return kwargs


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embeddings' device (the first device under device_map="auto")."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but no CUDA device is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def import_transformers() -> float:
    """Import what every `from_pretrained` of a causal LM needs, now; returns the seconds it took.

    transformers imports lazily: the first `AutoModelForCausalLM` pulls in its tensor-parallel
    integration (torch.distributed.tensor, sympy), generation (scikit-learn when installed) and
    masking utilities (torch._dynamo); measured 7.9 s of a 9.4 s first load on an H200 machine, the
    same imports ModelOpt's process pays before its own load. Timed apart so that the load stage
    says how much of it is loading.
    """
    import time

    start = time.perf_counter()
    import transformers

    transformers.AutoModelForCausalLM   # noqa: B018 - the lazy attribute access is the import
    transformers.AutoConfig             # noqa: B018
    return time.perf_counter() - start


def load_calibration_model(
    model_ref: str,
    *,
    device: str = "auto",
    dtype: torch.dtype = DEFAULT_DTYPE,
    token: str | None = None,
    revision: str | None = None,
) -> nn.Module:
    """The full model as the checkpoint's `architectures` names it (ConditionalGeneration wrappers
    included), else AutoModelForCausalLM / AutoModelForImageTextToText. No remote code."""
    import transformers

    # Our own progress events cover loading; transformers' tqdm bar would leak into
    # `--progress none|json` output and the service's worker logs.
    transformers.utils.logging.disable_progress_bar()
    local = Path(model_ref).is_dir()
    common = dict(trust_remote_code=False, local_files_only=local, token=token, revision=revision)
    try:
        config = transformers.AutoConfig.from_pretrained(model_ref, **common)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedArchitectureError(
            f"transformers {transformers.__version__} cannot load the config of {model_ref}: {exc}"
        ) from None
    candidates = [_model_class(transformers, a) for a in (getattr(config, "architectures", None) or [])]
    candidates = [c for c in candidates if c is not None]
    candidates += [transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText]
    device = _resolve_device(device)
    load_kwargs = dict(common, dtype=dtype)
    if device.startswith("cuda"):
        load_kwargs["device_map"] = "auto" if device == "cuda" else device
    errors = []
    for cls in candidates:
        try:
            model = cls.from_pretrained(model_ref, **load_kwargs)
        except OSError as exc:  # missing / unreadable weights: no other class will do better
            raise CheckpointReadError(f"cannot load {model_ref} for calibration: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"{getattr(cls, '__name__', cls)}: {exc}")
            continue
        return model.eval()
    raise UnsupportedArchitectureError(
        f"no transformers model class can load {model_ref} for calibration: " + "; ".join(errors[:3])
    )


def _model_class(transformers: Any, name: str) -> type | None:
    """The built-in transformers class a checkpoint's `architectures` entry names, if any."""
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # noqa: BLE001 - lazy-module import failures of optional backends
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else None


#: A tokenizer with fewer tokens than this share of the model's vocabulary cannot be the model's
#: (real tokenizers cover nearly all of their embedding; the tiny test models' cover about half).
MIN_TOKENIZER_SHARE = 0.25


def tokenizer_problem(tokenizer: Any, vocab_size: int | None) -> str | None:
    """Why `tokenizer` cannot be the tokenizer of a model with `vocab_size` embedding rows, or None.

    transformers 5 builds an empty tokenizer (one special token) for a directory without tokenizer
    files instead of raising (Qwen3-MoE: an empty Qwen2Tokenizer); packing text with it, or capping
    the vocabulary to it, breaks calibration. Empty or far smaller than the vocabulary: not the model's.
    """
    try:
        size = len(tokenizer)
    except TypeError:
        size = int(getattr(tokenizer, "vocab_size", 0) or 0)
    specials = len(set(getattr(tokenizer, "all_special_ids", None) or []))
    if size <= specials:
        return f"it is empty ({size} token(s), {specials} of them special)"
    if vocab_size and size < MIN_TOKENIZER_SHARE * vocab_size:
        return f"its {size} tokens are far fewer than the model's vocabulary of {vocab_size}"
    return None


def load_tokenizer(
    model_ref: str, token: str | None, revision: str | None, *, vocab_size: int | None = None
) -> Any | None:
    """The model's tokenizer, or None when there is none or the one found cannot be the model's
    (see `tokenizer_problem`; `vocab_size`: the model's embedding rows), with one warning then."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_ref,
            trust_remote_code=False,
            local_files_only=Path(model_ref).is_dir(),
            token=token,
            revision=revision,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.info("no tokenizer for %s (%s); only random calibration data is available", model_ref, exc)
        return None
    problem = tokenizer_problem(tokenizer, vocab_size)
    if problem is not None:
        logger.warning(
            "ignoring the %s that transformers built for %s: %s; the model is treated as having no "
            "tokenizer (add its tokenizer files for text calibration data; random data needs none)",
            type(tokenizer).__name__,
            model_ref,
            problem,
        )
        return None
    return tokenizer
