"""Sensitivity scores on disk (`--scores FILE`): score once, re-plan at any budget without the model.

The file records, per decision group, its member modules, its numel and one score per scheme
scored, plus how the scores were made (method, samples, data, seed) and a fingerprint of the
model they belong to: a SHA-256 of config.json (canonical JSON) and one of the tensor index
(every tensor's name, dtype and shape). Loading checks the format version, every field, and the
fingerprint against the model being planned, so scores are never reused for another model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.exporter.auto.groups import DecisionGroup
from quantgate.exporter.jsonfile import check_format, read_json, write_json_atomic
from quantgate.validators.errors import UsageError

SCORES_FORMAT = "quantgate.auto_scores"
SCORES_VERSION = 1


class ScoresFileError(UsageError):
    """A scores file is unreadable, from a newer version, inconsistent, or for another model (exit 2)."""


def fingerprint(config: Mapping[str, Any] | None, tensors: Mapping[str, Any]) -> dict[str, str]:
    """{"config_sha256", "tensors_sha256"} of a checkpoint (`tensors`: name -> TensorInfo)."""
    config_text = json.dumps(config or {}, sort_keys=True, separators=(",", ":"), default=str)
    index = "\n".join(f"{name}\t{info.dtype}\t{list(info.shape)}" for name, info in sorted(tensors.items()))
    return {
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "tensors_sha256": hashlib.sha256(index.encode()).hexdigest(),
    }


@dataclass
class ScoreTable:
    """Scores per decision group and scheme (lower = less damage), with their provenance."""

    method: str
    schemes: tuple[str, ...]  # scheme names scored (BF16 is 0 by definition)
    scores: dict[str, dict[str, float]]  # group key -> scheme -> score
    modules: dict[str, list[str]]  # group key -> member modules
    numel: dict[str, int]  # group key -> Σ out × in
    fingerprint: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def check_model(self, expected: Mapping[str, str], *, origin: str) -> None:
        """Refuse scores made for another model (config or tensors differ)."""
        for key in ("config_sha256", "tensors_sha256"):
            if self.fingerprint.get(key) != expected.get(key):
                what = "config.json" if key == "config_sha256" else "tensor names, dtypes or shapes"
                raise ScoresFileError(
                    f"{origin}: the scores were made for another model (its {what} differ from this "
                    f"one's: {self.metadata.get('model', 'unknown model')}). Rescore: drop --scores or give "
                    "a new file."
                )

    def check_covers(
        self, groups: Sequence[DecisionGroup], schemes: Sequence[str], method: str, *, origin: str
    ) -> None:
        """The file must score every group (same members) under every candidate, with `method`."""
        if method != self.method:
            raise ScoresFileError(
                f"{origin}: scores were made with --method {self.method}, not {method}; "
                f"use --method {self.method} or give a new scores file"
            )
        missing = [s for s in schemes if s not in self.schemes]
        if missing:
            raise ScoresFileError(
                f"{origin}: no scores for candidate(s) {', '.join(missing)} (the file has "
                f"{', '.join(self.schemes)}); rescore with these candidates"
            )
        for group in groups:
            if self.modules.get(group.key) != list(group.modules):
                raise ScoresFileError(
                    f"{origin}: group {group.key} differs from the file's (different model or "
                    "layout version); rescore"
                )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCORES_FORMAT,
            "version": SCORES_VERSION,
            "method": self.method,
            "schemes": list(self.schemes),
            "fingerprint": dict(self.fingerprint),
            "metadata": dict(self.metadata),
            "groups": {
                key: {
                    "modules": self.modules[key],
                    "numel": self.numel[key],
                    "scores": dict(sorted(self.scores[key].items())),
                }
                for key in sorted(self.scores)
            },
        }

    def save(self, path: Path | str) -> Path:
        """Write JSON atomically (temp file + rename); returns the path."""
        return write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "scores file") -> ScoreTable:
        """Validate a decoded JSON object; every problem names the file and the field."""

        def bad(problem: str) -> ScoresFileError:
            return ScoresFileError(f"{origin}: {problem}")

        raw = check_format(
            raw, fmt=SCORES_FORMAT, newest=SCORES_VERSION, kind="scores", redo="rescore", bad=bad
        )
        method, schemes = raw.get("method"), raw.get("schemes")
        if (
            not isinstance(method, str)
            or not isinstance(schemes, list)
            or not all(isinstance(s, str) for s in schemes)
        ):
            raise bad("'method' must be a string and 'schemes' a list of scheme names")
        fp, metadata, groups = raw.get("fingerprint"), raw.get("metadata", {}), raw.get("groups")
        if not isinstance(fp, Mapping) or not all(isinstance(v, str) for v in fp.values()):
            raise bad("'fingerprint' must be an object of strings")
        if not isinstance(metadata, Mapping):
            raise bad("'metadata' must be an object")
        if not isinstance(groups, Mapping) or not groups:
            raise bad("'groups' must be a non-empty object")
        table = cls(method, tuple(schemes), {}, {}, {}, dict(fp), dict(metadata))
        for key, entry in groups.items():
            table._read_group(str(key), entry, bad)
        return table

    def _read_group(self, key: str, entry: Any, bad: Any) -> None:
        if not isinstance(entry, Mapping):
            raise bad(f"group {key!r} must be an object")
        modules, numel, scores = entry.get("modules"), entry.get("numel"), entry.get("scores")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise bad(f"group {key!r}: 'modules' must be a non-empty list of names")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel <= 0:
            raise bad(f"group {key!r}: 'numel' must be a positive integer")
        if not isinstance(scores, Mapping):
            raise bad(f"group {key!r}: 'scores' must be an object")
        clean: dict[str, float] = {}
        for name, value in scores.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0:
                raise bad(f"group {key!r}: score under {name!r} is {value!r}; scores are finite numbers >= 0")
            clean[str(name)] = float(value)
        self.modules[key], self.numel[key], self.scores[key] = list(modules), numel, clean

    @classmethod
    def load(cls, path: Path | str) -> ScoreTable:
        path = Path(path)
        raw = read_json(path, error=ScoresFileError, what="scores file")
        return cls.from_dict(raw, origin=str(path))
