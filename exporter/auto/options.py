"""Options of the `auto` recipe, checked without torch (the CLI, the job API and the pipeline share it).

`--recipe auto --bits B [--candidates nvfp4,fp8] [--method gradient|kl_div] [--score-samples N]
[--scores FILE]`: B is the effective-bits budget (NVFP4 counts 4.5 bits, FP8 8, BF16 16; BF16 is
always a candidate). The planning itself lives in `quantgate.exporter.auto` (which imports torch); this
module only validates the request, so bad input fails before anything is loaded and the service
can answer 422 without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from quantgate.exporter.schemes import writable_algos
from quantgate.validators.errors import UsageError
from quantgate.validators.schemes import MIXED_PRECISION_ALGOS, scheme

AUTO_RECIPE = "auto"
#: The only dialect with a per-layer mixed-precision form the engines read (MIXED_PRECISION).
AUTO_DIALECT = "modelopt"
AUTO_METHODS: tuple[str, ...] = ("gradient", "kl_div")
DEFAULT_CANDIDATES: tuple[str, ...] = ("nvfp4", "fp8")
DEFAULT_METHOD = "gradient"
DEFAULT_SCORE_SAMPLES = 128
#: Per-layer algos an `auto` export can write: vLLM's MIXED_PRECISION algos that the writer has
#: numerics and a ModelOpt form for (`quantgate.exporter.schemes.writable_algos`).
EXPORTABLE_ALGOS: tuple[str, ...] = tuple(a for a in MIXED_PRECISION_ALGOS if a in writable_algos())
#: The budget is in bits per weight: BF16 (16) is the most any plan can use.
MAX_BITS = 16.0
#: Spellings of "no quantization" accepted in a candidate list (BF16 is always a candidate anyway).
BF16_NAMES = frozenset({"BF16", "NONE"})


def parse_candidates(value: str | Iterable[str]) -> tuple[str, ...]:
    """`"nvfp4,fp8"` or `["nvfp4", "fp8"]` -> ("nvfp4", "fp8"): stripped, lower-case, de-duplicated."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict[str, None] = {}
    for item in items:
        name = str(item).strip().lower()
        if name:
            out[name] = None
    return tuple(out)


#: How each option is named to the user: command-line flags, or job-body fields (service API).
CLI_NAMES: dict[str, str] = {"bits": "--bits", "candidates": "--candidates", "method": "--method",
                             "score_samples": "--score-samples", "scores": "--scores", "dialect": "--dialect"}
API_NAMES: dict[str, str] = {key: f'"{key}"' for key in CLI_NAMES}


def check_candidates(candidates: Sequence[str], names: Mapping[str, str] = CLI_NAMES) -> tuple[str, ...]:
    """The candidate names, each resolved to an exportable scheme; BF16 spellings are dropped."""
    allowed = ", ".join(a.lower() for a in EXPORTABLE_ALGOS)
    quantized = tuple(n for n in parse_candidates(candidates) if n.upper() not in BF16_NAMES)
    for name in quantized:
        try:
            spec = scheme("modelopt", name)
        except KeyError:
            spec = None
        if spec is None or spec.quant_algo not in EXPORTABLE_ALGOS:
            raise UsageError(f"auto: candidate {name!r} cannot be exported per layer; choose from {allowed} "
                             "(BF16 is always a candidate)")
    if not quantized:
        raise UsageError(f"auto: {names['candidates']} needs at least one quantized format ({allowed}); "
                         "BF16 is implied")
    return quantized


def check_bits(bits: float | None, names: Mapping[str, str] = CLI_NAMES) -> float:
    """The effective-bits budget: a finite number in (0, 16]."""
    if bits is None:
        raise UsageError(f"recipe auto needs {names['bits']}: the effective bits per weight to fit (e.g. 6.0; "
                         "NVFP4 counts 4.5 bits, FP8 8, BF16 16)")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise UsageError(f"{names['bits']} must be a number of bits per weight, got {bits!r}")
    if not 0 < bits <= MAX_BITS:
        raise UsageError(f"{names['bits']} must be in (0, {MAX_BITS:g}] bits per weight, got {bits:g}")
    return float(bits)


def check_method(method: str, names: Mapping[str, str] = CLI_NAMES) -> str:
    if method not in AUTO_METHODS:
        raise UsageError(f"auto: unknown {names['method']} {method!r}; choose one of: {', '.join(AUTO_METHODS)}")
    return method


def check_score_samples(samples: int, names: Mapping[str, str] = CLI_NAMES) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"{names['score_samples']} must be a positive integer, got {samples!r}")
    return samples


def check_scores_path(scores: str | Path | None) -> Path | None:
    """An existing scores file is reused; a new one is written, so its directory must exist."""
    if scores is None:
        return None
    path = Path(scores).expanduser()
    if path.is_dir():
        raise UsageError(f"--scores {scores}: is a directory; give a file name (e.g. scores.json)")
    if not path.exists() and not path.parent.is_dir():
        raise UsageError(f"--scores {scores}: directory {path.parent} does not exist")
    return path


def check_only_for_auto(recipe: str, given: Mapping[str, object], names: Mapping[str, str]) -> None:
    stray = [names[key] for key, value in given.items() if value is not None]
    if recipe != AUTO_RECIPE and stray:
        verb = "applies" if len(stray) == 1 else "apply"
        raise UsageError(f"{', '.join(stray)} only {verb} to recipe auto (got recipe {recipe})")


def check_auto_request(recipe: str, *, bits: float | None, candidates: Sequence[str], method: str,
                       score_samples: int, scores: str | Path | None, dialect: str = AUTO_DIALECT) -> None:
    """A QuantizeRequest's `auto` options, or (for any other recipe) that no `auto`-only one is set."""
    check_only_for_auto(recipe, {"bits": bits, "scores": scores}, CLI_NAMES)
    if recipe != AUTO_RECIPE:
        return
    if dialect != AUTO_DIALECT:
        raise UsageError(f"recipe auto writes ModelOpt MIXED_PRECISION checkpoints; --dialect {dialect} is not "
                         f"supported with it (use --dialect {AUTO_DIALECT})")
    check_bits(bits)
    check_candidates(candidates)
    check_method(method)
    check_score_samples(score_samples)
    check_scores_path(scores)


def check_job_options(recipe: str, *, bits: float | None, candidates: Sequence[str] | None,
                      method: str | None, score_samples: int | None) -> None:
    """The `auto` fields of a job body (None = not given; defaults apply), named as the API names them."""
    given = {"bits": bits, "candidates": candidates, "method": method, "score_samples": score_samples}
    check_only_for_auto(recipe, given, API_NAMES)
    if recipe != AUTO_RECIPE:
        return
    check_bits(bits, API_NAMES)
    check_candidates(DEFAULT_CANDIDATES if candidates is None else candidates, API_NAMES)
    check_method(DEFAULT_METHOD if method is None else method, API_NAMES)
    check_score_samples(DEFAULT_SCORE_SAMPLES if score_samples is None else score_samples, API_NAMES)
