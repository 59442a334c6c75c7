"""Activation statistics: the only thing calibration hands to the weight pass.

`ActivationStats` maps on-disk module names (the names the layout and the writer use, e.g.
`model.layers.0.self_attn.q_proj`, `model.layers.1.block_sparse_moe.experts.3.w1`, or virtual
per-expert names such as `model.layers.0.experts.3.gate_proj` for fused 3-D experts) to the input
amax (max |x| over every calibration token). It is saved as `calibration.json` next to the export
and can be reused (`--calib-stats FILE`), so a weight pass never needs the model instantiated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.exporter.jsonfile import check_format, read_json, write_json_atomic
from quantgate.validators.errors import QuantgateError, UsageError

STATS_FORMAT = "quantgate.activation_stats"
STATS_VERSION = 1
STATS_FILE_NAME = "calibration.json"


class CalibrationError(QuantgateError):
    """Calibration could not produce trustworthy statistics (module never reached, overflow ...)."""


class ActivationStatsError(UsageError):
    """An activation-stats file is unreadable, from a newer version, or inconsistent (CLI exit 2)."""


@dataclass
class ActivationStats:
    """Input amax per module plus what the report needs to explain them.

    amax:             on-disk module name -> max |input| over all calibration tokens (finite, > 0)
    expert_tokens:    on-disk MoE group (e.g. `model.layers.1.mlp.experts`) -> tokens the real router
                      sent to each expert (index = expert id)
    unrouted_experts: `<moe group>.<expert>` for experts the real router never chose
    uncalibrated:     modules whose amax is a fallback (layer maximum for experts that saw no token,
                      fused-group maximum for a Linear that never ran); reported as warnings
    warnings:         human-readable lines for the export report
    metadata:         samples, seq_len, data source, model, all_experts, tokens, tokens_per_s, ...
    """

    amax: dict[str, float]
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    unrouted_experts: list[str] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.amax

    def input_amax(self, name: str) -> float:
        """The input amax of one module; a clear error when the stats do not cover it."""
        try:
            return self.amax[name]
        except KeyError:
            raise ActivationStatsError(
                f"activation stats have no input amax for module {name!r}; they were recorded for a "
                f"different model or plan (model: {self.metadata.get('model', 'unknown')}). Re-run "
                "calibration (drop --calib-stats) for this model and recipe."
            ) from None

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names the stats do not cover, in the given order."""
        return [n for n in names if n not in self.amax]

    def check_covers(self, names: Iterable[str]) -> None:
        """Raise ActivationStatsError when any of `names` has no amax (reused stats vs a new plan)."""
        absent = self.missing(names)
        if absent:
            shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            raise ActivationStatsError(
                f"activation stats do not cover {len(absent)} module(s) the plan quantizes with static "
                f"input scales: {shown}. Re-run calibration (drop --calib-stats) for this model and recipe."
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "metadata": dict(self.metadata),
            "amax": dict(sorted(self.amax.items())),
            "expert_tokens": {k: list(v) for k, v in sorted(self.expert_tokens.items())},
            "unrouted_experts": list(self.unrouted_experts),
            "uncalibrated": list(self.uncalibrated),
            "warnings": list(self.warnings),
        }

    def save(self, path: Path | str) -> Path:
        """Write JSON atomically (temp file + rename); returns the path written."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE_NAME
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "activation stats") -> ActivationStats:
        """Validate a decoded JSON object; every problem names the file and the field."""

        def bad(problem: str) -> ActivationStatsError:
            return ActivationStatsError(f"{origin}: {problem}")

        raw = check_format(
            raw,
            fmt=STATS_FORMAT,
            newest=STATS_VERSION,
            kind="activation-stats",
            redo="re-run calibration",
            bad=bad,
        )
        amax = raw.get("amax")
        if not isinstance(amax, Mapping) or not amax:
            raise bad("'amax' must be a non-empty object of module name -> number")
        clean: dict[str, float] = {}
        for name, value in amax.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise bad(f"amax of {name!r} is {value!r}; every amax must be a finite number > 0")
            clean[str(name)] = float(value)
        tokens = raw.get("expert_tokens", {})
        if not isinstance(tokens, Mapping) or not all(
            isinstance(v, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v)
            for v in tokens.values()
        ):
            raise bad("'expert_tokens' must map MoE groups to lists of non-negative integers")
        lists = {}
        for key in ("unrouted_experts", "uncalibrated", "warnings"):
            value = raw.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad(f"{key!r} must be a list of strings")
            lists[key] = list(value)
        metadata = raw.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise bad("'metadata' must be an object")
        return cls(
            amax=clean,
            expert_tokens={str(k): list(v) for k, v in tokens.items()},
            metadata=dict(metadata),
            **lists,
        )

    @classmethod
    def load(cls, path: Path | str) -> ActivationStats:
        """Read and validate a stats file (or a directory holding `calibration.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE_NAME
        raw = read_json(path, error=ActivationStatsError, what="activation stats file")
        return cls.from_dict(raw, origin=str(path))
