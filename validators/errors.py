"""Typed domain errors. Every message says what is wrong and what to do next."""

from __future__ import annotations


class QuantgateError(Exception):
    """Base class for every error quantgate raises on purpose."""


class CheckpointReadError(QuantgateError):
    """The target cannot be read as a checkpoint at all (CLI exit code 2)."""


class HeaderError(CheckpointReadError):
    """A safetensors header is corrupt, truncated, oversized or hostile."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class UnsupportedArchitectureError(QuantgateError):
    """The checkpoint's architecture or naming is not one the layout table knows."""


class UsageError(QuantgateError):
    """The request or command line is wrong (unknown recipe, bad option value)."""
