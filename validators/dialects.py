"""Dispatch to the dialect modules of the engines' other formats (gptq, awq, mxfp4).

`validators/rules/_context.Analysis` asks here what a config declares for a module when the config
is not ModelOpt or compressed-tensors; each dialect module owns its parsing and engine facts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from validators.schemes import AWQ, GPTQ, MXFP4

if TYPE_CHECKING:
    from validators.layout import Module
    from validators.quant_config import QuantConfig
    from validators.schemes import SchemeSpec

#: dialects whose specs, parsing and rules live in validators/dialects_*.py and rules/{wna16,mxfp4}*.py
BEYOND_DIALECTS: frozenset[str] = frozenset({GPTQ, AWQ, MXFP4})


def _declared_fn(dialect: str) -> Callable | None:
    if dialect in (GPTQ, AWQ):
        from validators.dialects_wna16 import declared
        return declared
    if dialect == MXFP4:
        from validators.dialects_mxfp4 import declared as mx_declared
        return mx_declared
    return None


def declared_schemes(qc: "QuantConfig", module: "Module", engine_name: str) -> "list[SchemeSpec]":
    """Specs `qc` promises for `module` ([] when the dialect is not one of these or declares none)."""
    fn = _declared_fn(qc.dialect)
    if fn is None or qc.params is None:
        return []
    return fn(qc, module, engine_name)
