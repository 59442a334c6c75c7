"""The dialect registry: one line per quantization dialect modelled beyond ModelOpt and compressed-tensors.

A dialect module (validators/fp8_config.py, dialects_wna16.py, dialects_mxfp4.py) owns its config
parsing and the schemes its config promises per module:

- a parser `(data, source, findings) -> QuantConfig` that puts the dialect's own settings in
  `QuantConfig.params` (fp8: Fp8Settings, gptq/awq: WNA16Params, mxfp4: Mxfp4Params);
- `declared(qc, module, engine_name) -> list[SchemeSpec]`.

Which `quant_method` spellings reach which dialect, and whether a format is modelled at all, is read
from `quantgate.validators.format_support` (one table with sources); a method or format marked not modelled
there gets the `unknown` verdict (rules/dialects.py QG190), whatever this registry holds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from quantgate.validators.schemes import AWQ, FP8_NATIVE, GPTQ, MXFP4
from quantgate.validators.schemes_beyond import BEYOND_DIALECTS as _BEYOND

if TYPE_CHECKING:
    from quantgate.validators.findings import Finding
    from quantgate.validators.layout import Module
    from quantgate.validators.quant_config import QuantConfig
    from quantgate.validators.schemes import SchemeSpec

#: dialect -> (module, parser function); the module also defines `declared`. Imported on first use.
DIALECT_MODULES: dict[str, tuple[str, str]] = {
    FP8_NATIVE: ("quantgate.validators.fp8_config", "parse"),
    MXFP4: ("quantgate.validators.dialects_mxfp4", "parse_mxfp4"),
    GPTQ: ("quantgate.validators.dialects_wna16", "parse_gptq"),
    AWQ: ("quantgate.validators.dialects_wna16", "parse_awq"),
}
#: dialects whose specs, parsing and rules live in validators/dialects_*.py and rules/{wna16,mxfp4}*.py
BEYOND_DIALECTS: frozenset[str] = frozenset(_BEYOND)


def parse_registered(method: str, data: dict, source: str, findings: "list[Finding]") -> "QuantConfig | None":
    """Parse `data` with the dialect that `method` (a quant_method, lower case) belongs to; None when
    no registered dialect models it (the caller keeps a bare QuantConfig, verdict `unknown`)."""
    from quantgate.validators.format_support import method_support

    entry = method_support(method)
    if entry is None or not entry.modelled or entry.dialect not in DIALECT_MODULES:
        return None
    module, fn = DIALECT_MODULES[entry.dialect]
    return getattr(importlib.import_module(module), fn)(data, source, findings)


def declared_schemes(qc: "QuantConfig", module: "Module", engine_name: str) -> "list[SchemeSpec]":
    """Specs `qc` promises for `module` ([] when the dialect is not registered or was not parsed)."""
    entry: Any = DIALECT_MODULES.get(qc.dialect)
    if entry is None or qc.params is None:
        return []
    return importlib.import_module(entry[0]).declared(qc, module, engine_name)
