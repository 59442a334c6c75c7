"""QG3xx: each quantized module's tensor set, dtypes and shapes against the scheme table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, INFO, LOADS_WRONG, WARNING, finding

if TYPE_CHECKING:
    from quantgate.validators.rules._context import ModClass
    from quantgate.validators.schemes import SchemeSpec

#: suffix -> what the engine does when it is missing (vllm_sglang.md §7: nothing checks it was loaded)
MISSING_EFFECT: dict[str, str] = {
    "input_scale": "input_scale stays uninitialised (zeros) -> 1/0 -> inf/NaN outputs (vllm#45212)",
    "input_global_scale": "input_global_scale stays uninitialised -> garbage activations",
    "weight_scale_2": "weight_scale_2 stays torch.empty -> garbage weights (vllm PR #54444)",
    "weight_global_scale": "weight_global_scale stays uninitialised -> garbage weights",
    "weight_scale": "block scales stay uninitialised -> garbage weights",
}


def expected_scheme(ctx: Context, cls: "ModClass") -> "SchemeSpec | None":
    """The declared scheme for a quantized class (the bytes' scheme when the config allows several)."""
    allowed = ctx.a.declared(cls.rep, cls.rep.name)
    st = cls.state
    if st.scheme is not None and (not allowed or st.scheme in allowed):
        return st.scheme
    if len(allowed) > 1 and st.scheme is None:      # pick the declared spec sharing most suffixes
        have = set(cls.rep.tensors)
        return max(allowed, key=lambda s: (len(s.suffixes & have), -len(s.suffixes ^ have)))
    return allowed[0] if allowed else st.scheme


def _quantized_2d(ctx: Context) -> Iterator[tuple["ModClass", "SchemeSpec"]]:
    for cls in ctx.a.quantized_classes:
        spec = expected_scheme(ctx, cls)
        if spec is not None and cls.rep.fused is None:
            yield cls, spec


@rule("QG301", "missing-sibling-tensors", ERROR, per_engine=False)
def missing_siblings(ctx: Context) -> Iterator[Finding]:
    """A quantized module lacks tensors its scheme requires (e.g. one expert without `input_scale`).

    Why: invariants 4, 5, 14. Neither engine checks that a quantized parameter was loaded
    (`default_loader.track_weights_loading` is off for quantized models): the missing scale keeps its
    `torch.empty` value -> zeros -> 1/0 -> NaN or pad tokens, prompt dependent (vllm#45212).

    Fix: re-export with calibration covering every module (every expert must get an input_scale).
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for cls, spec in _quantized_2d(ctx):
        for suffix in sorted(spec.required_suffixes - set(cls.rep.tensors)):
            groups[suffix].extend(cls.names)
    for suffix, names in sorted(groups.items()):
        yield finding("QG301", ERROR, f"{len(names)} quantized module(s) have no `{suffix}`", modules=names,
                      fix=f"Re-export so every quantized module carries `{suffix}` (calibrate every expert).",
                      effect=LOADS_WRONG, error="silent: " + MISSING_EFFECT.get(suffix, f"{suffix} uninitialised"),
                      suffix=suffix)


@rule("QG302", "wrong-dtype", ERROR, per_engine=False)
def wrong_dtype(ctx: Context) -> Iterator[Finding]:
    """A quantized tensor has a dtype its scheme does not allow (e.g. NVFP4 `weight_scale` stored U8).

    Why: invariant 5. `copy_` converts dtypes numerically instead of bit-casting, so an F8_E4M3 block
    scale stored as U8 loads as garbage (vllm_sglang.md §7); no error is raised.

    Fix: store each tensor in the dtype of the scheme table (see `validators/schemes.py`).
    """
    groups: dict[tuple[str, str, tuple[str, ...]], list[str]] = defaultdict(list)
    for cls, spec in _quantized_2d(ctx):
        for suffix, info in cls.rep.tensors.items():
            tspec = spec.by_suffix.get(suffix)
            if tspec is not None and info.dtype not in tspec.dtypes:
                groups[(suffix, info.dtype, tspec.dtypes)].extend(cls.names)
    for (suffix, dtype, allowed), names in sorted(groups.items()):
        yield finding("QG302", ERROR, f"`{suffix}` is {dtype} in {len(names)} module(s); {'/'.join(allowed)} expected",
                      modules=names, fix=f"Write `{suffix}` as {allowed[0]}.", effect=LOADS_WRONG,
                      error=f"silent: {dtype} `{suffix}` numerically converted to {allowed[0]}")


@rule("QG303", "wrong-shape", ERROR, per_engine=False)
def wrong_shape(ctx: Context) -> Iterator[Finding]:
    """A quantized tensor's shape does not fit the module's logical [out, in] under its scheme.

    Why: invariants 5, 16. vLLM sizes parameters from the model config; a different stored shape
    fails in `copy_`: "The size of tensor a (X) must match the size of tensor b (Y)".

    Fix: re-export; check the packing axis (NVFP4 packs along the input dim: [out, in/2]).
    """
    groups: dict[tuple[str, tuple, tuple], list[str]] = defaultdict(list)
    for cls, spec in _quantized_2d(ctx):
        m = cls.rep
        weight = m.tensors.get(spec.weight_suffix)
        if weight is None or len(weight.shape) != 2:
            continue
        out_f, in_f = spec.logical_from_weight(weight.shape)
        for suffix, info in m.tensors.items():
            tspec = spec.by_suffix.get(suffix)
            if tspec is None or suffix == spec.weight_suffix:
                continue
            accepted = tspec.accepted_shapes(out_f, in_f)
            if tuple(info.shape) not in accepted:
                groups[(suffix, tuple(info.shape), accepted[0])].extend(cls.names)
    for (suffix, got, want), names in sorted(groups.items()):
        yield finding("QG303", ERROR, f"`{suffix}` has shape {list(got)} in {len(names)} module(s); "
                      f"{list(want)} expected", modules=names, fix="Re-export with the scheme's shapes.",
                      effect=FAILS, error=f"RuntimeError: The size of tensor a ({want[-1] if want else 1}) must match "
                      f"the size of tensor b ({got[-1] if got else 1}) at non-singleton dimension {max(len(want) - 1, 0)}")


@rule("QG304", "divisibility", ERROR, per_engine=False)
def divisibility(ctx: Context) -> Iterator[Finding]:
    """A quantized module's input features are not a multiple of the scheme's block (16 for NVFP4, 128
    for FP8 blocks / W4A16 groups). Alignment per tensor-parallel rank is QG711 / QG712 (deployment.py).

    Why: invariant 6. vLLM raises "Unsupported model when in features size is not multiple of 16".

    Fix: keep such modules BF16 (exclude them).
    """
    hard: dict[tuple[str, int], list[str]] = defaultdict(list)
    for cls, spec in _quantized_2d(ctx):
        weight = cls.rep.tensors.get(spec.weight_suffix)
        if weight is None or len(weight.shape) != 2:
            continue
        in_f = spec.in_features_from_weight(weight.shape)
        if spec.in_divisor > 1 and in_f % spec.in_divisor:
            hard[(spec.name, spec.in_divisor)].extend(cls.names)
    for (name, div), names in sorted(hard.items()):
        yield finding("QG304", ERROR, f"{len(names)} {name} module(s) have in_features not divisible by {div}",
                      modules=names, fix="Exclude these modules (keep BF16).", effect=FAILS,
                      error=f"ValueError: Unsupported model when in features size is not multiple of {div}")


@rule("QG305", "unexpected-tensors", ERROR, per_engine=False)
def unexpected(ctx: Context) -> Iterator[Finding]:
    """Tensors the engine has no parameter for: scale-like tensors outside any module, or suffixes no
    scheme defines on a quantized module.

    Why: invariant 21. Unmatched names raise KeyError or "There is no module or parameter named ..."
    (vllm PR #31757, sglang #10175) unless the model loader happens to skip that suffix.

    Fix: drop the stray tensors or rename them to the engine's names.
    """
    from quantgate.validators.schemes import EXTRA_QUANT_SUFFIXES, SCHEME_SUFFIXES

    quant_tails = (SCHEME_SUFFIXES | EXTRA_QUANT_SUFFIXES) - {"weight", "k_scale", "v_scale", "q_scale"}
    # only quantization tensors count as stray: model buffers (Gemma4 router.per_expert_scale) are fine
    stray = [n for n in ctx.a.layout.unassigned if n.rpartition(".")[2] in quant_tails]
    odd: list[str] = []
    for cls in ctx.a.quantized_classes:
        spec = expected_scheme(ctx, cls)
        allowed = (spec.suffixes if spec else SCHEME_SUFFIXES) | (EXTRA_QUANT_SUFFIXES - {"pre_quant_scale"}) | {"bias"}
        foreign = [s for s in cls.rep.tensors if s not in allowed]
        if cls.rep.fused is None and foreign:
            odd.extend(f"{n}.{s}" for n in cls.names for s in foreign)
    names = stray + odd
    if names:
        yield finding("QG305", ERROR, f"{len(names)} tensor(s) match no engine parameter", modules=names,
                      fix="Remove the stray tensors or rename them to what the engine expects.", effect=FAILS,
                      error=f"ValueError: There is no module or parameter named '{names[0]}'")


def _kv_tensors(ctx: Context) -> list[str]:
    return ctx.a.kv_scale_names


@rule("QG306", "kv-cache-scales", WARNING, per_engine=False)
def kv_scales(ctx: Context) -> Iterator[Finding]:
    """KV-cache scales disagree with the config: FP8 KV declared without k/v scales (engines fall back
    to 1.0), scales present without a KV scheme (ignored), or non-scalar scales.

    Why: invariant 22. vLLM warns "Using KV cache scaling factor 1.0 for fp8_e4m3" and loses accuracy;
    non per-tensor scales raise "Only support per-tensor scaling factor for fp8 KV cache".

    Fix: calibrate the KV cache when declaring FP8 KV, or drop kv_cache_quant_algo.
    """
    qc = ctx.qc
    kv_algo = (qc.kv_cache_quant_algo or (qc.kv_cache_scheme and "FP8")) if qc else None
    names = _kv_tensors(ctx)
    if kv_algo and not names and ctx.a.is_quantized:
        yield finding("QG306", INFO, f"KV cache declared {kv_algo} but no k_scale/v_scale tensors are stored; "
                      "engines use scale 1.0 (ModelOpt's default fp8_cast export)",
                      fix="Calibrate the KV cache if accuracy matters (ModelOpt --kv_cache_qformat fp8).")
    # native fp8: Fp8Config gives every Attention an Fp8KVCacheMethod, which loads k/v scales as they are
    if names and not kv_algo and ctx.a.dialect != "fp8":
        yield finding("QG306", WARNING, f"{len(names)} k/v scale tensors stored but no KV-cache scheme declared; "
                      "engines skip them", modules=names, fix="Declare kv_cache_quant_algo FP8 or drop the scales.")
    big = [n for n in names if ctx.view.tensors[n].numel != 1]
    if big and kv_algo:
        yield finding("QG306", ERROR, f"{len(big)} KV-cache scales are not per-tensor scalars", modules=big,
                      fix="Store k_scale/v_scale as F32 scalars.", effect=FAILS,
                      error="ValueError: Only support per-tensor scaling factor for fp8 KV cache")


def _built_unquantized_beyond(ctx: Context, cls: "ModClass") -> bool:
    """The engines' other formats declare nothing for this module (mxfp4 Linear layers): the engine
    builds it BF16, and the dialect's own rule (QG442) says what its quantized tensors do."""
    from quantgate.validators.dialects import BEYOND_DIALECTS

    return ctx.qc is not None and ctx.qc.dialect in BEYOND_DIALECTS and not ctx.a.declared(cls.rep, cls.rep.name)


@rule("QG307", "unrecognised-format", ERROR, per_engine=False)
def unrecognised(ctx: Context) -> Iterator[Finding]:
    """A module carries quantization tensors that match no scheme of the dialect (after the checks above).

    Why: invariant 5. The engine builds the declared scheme's parameters; a foreign tensor set fails
    with a size mismatch or KeyError, or loads uninitialised scales.

    Fix: re-export the module with one scheme (or keep it BF16 and exclude it).
    """
    names = [n for cls in ctx.a.quantized_classes
             if cls.rep.fused is None and cls.kind != "router" and expected_scheme(ctx, cls) is None
             and not _built_unquantized_beyond(ctx, cls) for n in cls.names]
    if names and ctx.qc is not None:
        yield finding("QG307", ERROR, f"{len(names)} module(s) hold a tensor set no {ctx.a.dialect} scheme defines",
                      modules=names, fix="Re-export these modules with one scheme.", effect=FAILS,
                      error="RuntimeError: size mismatch / KeyError on the module's scale tensors")


def _fused_problems(spec: "SchemeSpec", cls: "ModClass") -> list[str]:
    """What keeps a fused 3-D module's tensors from being `spec` in its 3-D form (empty when they are)."""
    from quantgate.validators.fused_schemes import expert_views

    m = cls.rep
    views = expert_views(m.tensors, bool(m.fused and m.fused.transposed))
    problems = [f"no `{s}`" for s in sorted(spec.required_suffixes - set(views))]
    weight = views.get(spec.weight_suffix)
    if weight is None or len(weight.shape) != 2:
        return problems
    out_f, in_f = weight.shape[0], spec.in_features_from_weight(weight.shape)
    for suffix, info in sorted(views.items()):
        tspec = spec.by_suffix.get(suffix)
        if tspec is None or suffix == spec.weight_suffix:
            continue
        if info.dtype not in tspec.dtypes:
            problems.append(f"`{suffix}` is {info.dtype}, not {'/'.join(tspec.dtypes)}")
        stored = tuple(m.tensors[suffix].shape)
        if info.shape not in tspec.accepted_shapes(out_f, in_f):
            want = tspec.shape(out_f, in_f)
            layout = "[E, in, out]" if m.fused and m.fused.transposed else "[E, out, in]"
            want3 = want if len(want) < 2 else (stored[0], *(want[::-1] if layout == "[E, in, out]" else want))
            problems.append(f"`{suffix}` has shape {list(stored)}, {list(want3)} expected for {layout} storage")
    return problems


@rule("QG308", "fused-3d-expert-tensors", ERROR, per_engine=False)
def fused_3d_tensors(ctx: Context) -> Iterator[Finding]:
    """Quantized experts kept as fused 3-D tensors (ModelOpt's GPT-OSS / Llama4 form) lack a scale or
    store one in the wrong orientation.

    Why: invariants 4, 5, 16. ModelOpt writes `experts.gate_up_proj` U8 [E, in/2, out] with
    `_weight_scale` F8_E4M3 [E, in/16, out] (blocks of 16 along the input dim, then transposed back)
    and 0-d `_weight_scale_2` / `_input_scale` (modelopt.md §2). vLLM's llama4.py / gpt_oss.py loaders
    transpose each 3-D tensor into `w13_`/`w2_` parameters: a scale in another orientation fails in
    `copy_` ("The size of tensor a ... must match"), a missing one stays `torch.empty` (vllm_sglang.md §7).

    Fix: re-export the experts 3-D with every scale in the [E, in/16, out] orientation (quantgate's
    exporter.writers.bmm_experts), or keep them BF16 and exclude them.
    """
    from quantgate.validators.fused_schemes import fused_storage, per_expert_scalars

    groups: dict[tuple[str, bool], list[str]] = defaultdict(list)
    stacked: dict[str, list[str]] = defaultdict(list)
    flipped: list[str] = []
    for cls in ctx.a.quantized_classes:
        if cls.rep.fused is None:
            continue
        spec = expected_scheme(ctx, cls)
        if spec is None:
            continue
        for suffix in per_expert_scalars(cls.rep.tensors):
            stacked[suffix].extend(cls.names)
        if cls.state.scheme == spec:
            stored = fused_storage(ctx.a.dialect, cls.rep.tensors, cls.rep.fused.transposed)
            if stored is not None and stored[1] != cls.rep.fused.transposed:
                flipped.extend(cls.names)
            continue
        for problem in _fused_problems(spec, cls):
            groups[(problem, problem.startswith("no "))].extend(cls.names)
    if flipped:   # consistent, but not in the architecture's orientation: no verdict either
        yield finding("QG308", WARNING, f"{len(flipped)} fused 3-D expert module(s) are stored [E, out, in] although "
                      "this architecture stores its experts [E, in, out]; ModelOpt writes them transposed like the "
                      "source, and whether an engine's 3-D loader reads the other orientation is not modelled",
                      modules=flipped, fix="Store the experts and their block scales in the source's orientation.")
    for suffix, names in sorted(stacked.items()):   # a form we have not seen an engine read: no verdict
        yield finding("QG308", WARNING, f"{len(names)} fused 3-D expert module(s) store `{suffix}` per expert "
                      "([E]); ModelOpt writes one 0-d scale per 3-D tensor, the form the engines' 3-D loaders "
                      "are known to read", modules=names, fix=f"Store `{suffix}` as one F32 scalar per tensor.")
    for (problem, missing), names in sorted(groups.items()):
        yield finding("QG308", ERROR, f"{len(names)} fused 3-D expert module(s): {problem}", modules=names,
                      fix="Write the experts in ModelOpt's 3-D form (exporter.writers.bmm_experts) or exclude them.",
                      effect=LOADS_WRONG if missing else FAILS,
                      error=("silent: " + MISSING_EFFECT.get(problem[4:-1], "scale uninitialised")) if missing else
                      "RuntimeError: The size of tensor a must match the size of tensor b")
