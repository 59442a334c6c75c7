"""The scheme registry (`quantgate.exporter.schemes`): every entry is consistent with the validator's
tensor table, its functions resolve, and the recipes, auto and the writers read it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from quantgate.exporter.recipes import RECIPES, WRITABLE_DIALECTS
from quantgate.exporter.schemes import INPUT_SCALE, SCHEMES, Lazy, experts_3d_specs, lookup, writable_form
from quantgate.exporter.schemes.apply import fake_quant, quantize
from quantgate.validators.errors import QuantgateError
from quantgate.validators.layout import Kind
from quantgate.validators.schemes import COMPRESSED_TENSORS, MODELOPT, scheme

FORMS = [(s, f) for s in SCHEMES for f in s.forms]
IDS = [f"{s.name}-{f.dialect}" for s, f in FORMS]


@pytest.mark.parametrize(("entry", "form"), FORMS, ids=IDS)
def test_every_form_names_a_validator_spec_with_the_same_tensors(entry, form) -> None:
    """The tensors a form writes (canonical outputs renamed, plus the static input scale) are exactly
    the required tensors of the validator spec it names, so the validator checks what we meant."""
    spec = scheme(form.dialect, form.spec)
    num = entry.numerics_for(form)
    written = {form.suffix(o) for o in num.outputs}
    if num.input_scale is not None and spec.activation_scales:
        written.add(form.suffix(INPUT_SCALE))
    assert written == set(spec.required_suffixes)
    assert set(form.conversions) <= written
    for extra in form.also_reads:
        assert scheme(form.dialect, extra).weight_suffix == spec.weight_suffix


@pytest.mark.parametrize(("entry", "form"), FORMS, ids=IDS)
def test_calibration_needs_match_the_spec(entry, form) -> None:
    """A scheme calibrates exactly when its written specs store static activation scales."""
    if form.writable:
        assert entry.calibrates == scheme(form.dialect, form.spec).activation_scales


def test_every_lazy_function_resolves() -> None:
    lazies = []
    for entry in SCHEMES:
        nums = [entry.numerics] + [f.numerics for f in entry.forms if f.numerics is not None]
        for num in nums:
            lazies += [v for v in vars(num).values() if isinstance(v, Lazy)]
    assert lazies
    for lazy in lazies:
        assert callable(lazy.resolve()), lazy.path


def test_every_dialect_of_a_scheme_has_exactly_one_writable_form() -> None:
    for entry in SCHEMES:
        writable = [f.dialect for f in entry.forms if f.writable]
        assert sorted(writable) == sorted(entry.dialects), entry.name


def test_recipes_come_from_the_registry() -> None:
    from_registry = {r.name: (s.name, r.kinds, s.dialects) for s in SCHEMES for r in s.recipes}
    assert {n: (r.scheme_name, r.kinds, r.dialects) for n, r in RECIPES.items()} == from_registry
    assert WRITABLE_DIALECTS == ("modelopt", "compressed-tensors", "fp8", "mxfp4")


def test_lookup_reads_back_specs_we_do_not_write() -> None:
    entry, form = lookup(COMPRESSED_TENSORS, "FP8_DYNAMIC")
    assert entry.name == "FP8" and form.spec == "FP8" and form.dialect == COMPRESSED_TENSORS
    entry, form = lookup(MODELOPT, "NVFP4_WEIGHT_ONLY")
    assert entry.name == "NVFP4A16" and not form.writable
    with pytest.raises(QuantgateError, match="does not write modelopt:NVFP4_WEIGHT_ONLY"):
        writable_form(MODELOPT, scheme(MODELOPT, "NVFP4_WEIGHT_ONLY"))
    with pytest.raises(QuantgateError, match="supported: FP8, NVFP4"):
        writable_form(MODELOPT, scheme(COMPRESSED_TENSORS, "NVFP4"))


def test_shared_scale_kinds_as_the_engines_fuse() -> None:
    """NVFP4 fused groups of every decoder kind share weight_scale_2; FP8 only an expert's gate/up."""
    by_name = {s.name: s for s in SCHEMES}
    decoder = {Kind.ATTENTION, Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT}
    assert by_name["NVFP4"].shared_scale_kinds == decoder == by_name["NVFP4A16"].shared_scale_kinds
    assert by_name["FP8"].shared_scale_kinds == {Kind.EXPERT}
    assert experts_3d_specs() == {MODELOPT: frozenset({"NVFP4", "FP8"}), "mxfp4": frozenset({"MXFP4"})}


@pytest.mark.parametrize("name", ["NVFP4", "FP8", "NVFP4A16"])
def test_fake_quant_is_dequantize_of_quantize_with_the_shared_scale(name: str) -> None:
    entry = next(s for s in SCHEMES if s.name == name)
    g = torch.Generator().manual_seed(0)
    gate, up = ((torch.randn(32, 64, generator=g) * k).to(torch.bfloat16) for k in (1.0, 3.0))
    fq = fake_quant(entry, [gate, up], Kind.EXPERT)
    shared = entry.numerics.group_scale([gate, up])
    expected = entry.numerics.dequantize(*quantize(entry.numerics, gate, shared), dtype=gate.dtype)
    assert torch.equal(fq[0], expected) and fq[0].dtype == torch.bfloat16


def test_the_registry_imports_without_torch() -> None:
    code = ("import sys; import quantgate.exporter.schemes as s; "
            "assert 'torch' not in sys.modules; print(len(s.SCHEMES))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("scheme", [s.name for s in SCHEMES])
def test_every_forms_numerics_round_trip(scheme: str) -> None:
    """Each form's quantize output is what its dequantize reads (names and layout agree): the canonical
    outputs of every entry, fed back, give the weight within a 4-bit format's error."""
    import torch

    from quantgate.exporter.schemes import get_scheme
    from quantgate.exporter.schemes.apply import quantize

    entry = get_scheme(scheme)
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for form in entry.forms:
        num = entry.numerics_for(form)
        outs = quantize(num, w)
        assert len(outs) == len(num.outputs), (scheme, form.dialect)
        back = num.dequantize(*outs, dtype=torch.float32)
        assert back.shape == w.shape and float((back - w.float()).norm() / w.float().norm()) < 0.2, (scheme, form.dialect)
