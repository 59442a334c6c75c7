"""Findings, severities and per-engine verdicts: the vocabulary every rule and report shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class VerdictStatus(str, Enum):
    LOADS = "loads"
    FAILS = "fails"
    LOADS_WRONG = "loads_wrong"
    UNKNOWN = "unknown"     # a format or engine fact quantgate does not model: no prediction is made


ENGINES: tuple[str, ...] = ("vllm", "sglang")


@dataclass(frozen=True)
class Finding:
    """One rule violation.

    `modules` lists module names (or tensor/file names for integrity findings); the report folds
    long lists into brace ranges. `effect` says what the finding does to a load in the engines it
    names: FAILS (the loader raises `predicted_error`) or LOADS_WRONG (silent corruption), or
    UNKNOWN (the finding says quantgate does not model what the engine does here); None means it
    does not change the verdict.
    """

    code: str
    severity: Severity
    message: str
    modules: tuple[str, ...] = ()
    engines: tuple[str, ...] = ENGINES
    fix: str = ""
    effect: VerdictStatus | None = None
    predicted_error: str = ""
    details: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
            "modules": list(self.modules),
            "engines": list(self.engines),
            "fix": self.fix,
            "effect": self.effect.value if self.effect else None,
            "predicted_error": self.predicted_error,
        }
