"""The scheme registry: one entry per quantization scheme, read by every writer, auto, the recipes and
the dequantizing loader (torch-free to import; numerics are resolved on first use).

- `core`: the types (`Scheme`, `Numerics`, `Form`, `RecipeDef`, `Lazy`, `ct_args`).
- `table`: the entries (`SCHEMES`).
- `apply`: the generic quantize / fake-quant / read-back over an entry (imports torch).
"""

from __future__ import annotations

from quantgate.exporter.schemes.core import (
    DECODER_LINEAR_KINDS,
    INPUT_SCALE,
    SCALE_CONVERSIONS,
    Form,
    Lazy,
    Numerics,
    RecipeDef,
    Scheme,
    ct_args,
)
from quantgate.exporter.schemes.table import SCHEMES
from quantgate.validators.errors import QuantgateError
from quantgate.validators.schemes import SchemeSpec

_BY_NAME: dict[str, Scheme] = {s.name: s for s in SCHEMES}
_BY_ALGO: dict[str, Scheme] = {s.quant_algo: s for s in SCHEMES if s.quant_algo}
#: (dialect, validator spec name) -> (scheme, form), for the written and the read-only specs.
_BY_SPEC: dict[tuple[str, str], tuple[Scheme, Form]] = {
    (f.dialect, name): (s, f) for s in SCHEMES for f in s.forms for name in (f.spec, *f.also_reads)}


def get_scheme(name: str) -> Scheme:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise QuantgateError(f"unknown scheme {name!r}; known: {', '.join(_BY_NAME)}") from None


def scheme_for_algo(quant_algo: str) -> Scheme | None:
    """The scheme ModelOpt names `quant_algo` (case-insensitive), or None."""
    return _BY_ALGO.get(quant_algo.upper())


def lookup(dialect: str, spec_name: str) -> tuple[Scheme, Form] | None:
    """The scheme and form whose validator spec in `dialect` is `spec_name` (written or read back)."""
    return _BY_SPEC.get((dialect, spec_name))


def writable_form(dialect: str, spec: SchemeSpec | None, writer: str | None = None) -> tuple[Scheme, Form]:
    """The entry the `dialect` writer writes for a plan's validator spec, or a QuantgateError naming
    what that writer can write."""
    found = _BY_SPEC.get((spec.dialect, spec.name)) if spec is not None else None
    ok = found is not None and spec is not None and spec.dialect == dialect
    if not ok or not found[1].writable or found[1].spec != spec.name:
        known = sorted(f.spec for s in SCHEMES for f in s.forms if f.dialect == dialect and f.writable)
        got = spec.key if spec is not None else "a mixed or empty plan"
        raise QuantgateError(f"the {writer or dialect} writer does not write {got} (supported: "
                             f"{', '.join(known) or 'none'})")
    return found


def writable_algos() -> frozenset[str]:
    """ModelOpt quant_algos quantgate writes."""
    return frozenset(s.quant_algo for s in SCHEMES for f in s.forms
                     if f.dialect == "modelopt" and f.writable and s.quant_algo)


def experts_3d_specs() -> dict[str, frozenset[str]]:
    """dialect -> the specs quantgate writes transposed 3-D experts in (`Form.experts_3d`)."""
    out: dict[str, set[str]] = {}
    for s in SCHEMES:
        for f in s.forms:
            if f.experts_3d and f.writable:
                out.setdefault(f.dialect, set()).add(f.spec)
    return {d: frozenset(v) for d, v in out.items()}


def static_input_schemes() -> dict[str, Scheme]:
    """Schemes with a static input scale, by name."""
    return {s.name: s for s in SCHEMES if s.numerics.input_scale is not None}


__all__ = ["DECODER_LINEAR_KINDS", "INPUT_SCALE", "SCALE_CONVERSIONS", "SCHEMES", "Form", "Lazy", "Numerics",
           "RecipeDef", "Scheme", "ct_args", "experts_3d_specs", "get_scheme", "lookup", "scheme_for_algo",
           "static_input_schemes", "writable_algos", "writable_form"]
