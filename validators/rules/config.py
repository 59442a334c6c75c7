"""QG1xx: the quantization config itself (found, parseable, recognised, consistent with the bytes)."""

from __future__ import annotations

from collections.abc import Iterator

from quantgate.validators.findings import Finding
from quantgate.validators.format_support import CT_FORMATS as CT_FORMAT_SUPPORT
from quantgate.validators.quant_config import DIALECTS, NVFP4_GROUP_SIZE
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, INFO, LOADS_WRONG, WARNING, finding

#: vLLM `ModelOptQuantConfigBase.QUANT_ALGOS` (config.json path).
VLLM_ALGOS = frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                        "MIXED_PRECISION"})
#: vLLM `_normalize_quantization_config` for a legacy hf_quant_config.json-only checkpoint.
VLLM_LEGACY_ALGOS = frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4"})
#: SGLang `ModelOptFp4Config` / `ModelOptFp8Config` / mixed.
SGLANG_ALGOS = frozenset({"FP8", "NVFP4", "MIXED_PRECISION", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"})
#: compressed-tensors formats (CT `CompressionFormat`; modelled or not: validators/format_support.py).
CT_FORMATS = frozenset(CT_FORMAT_SUPPORT)
KV_ALGOS = frozenset({"FP8", "NVFP4"})


@rule("QG100", "unquantized-checkpoint", INFO, per_engine=False)
def unquantized(ctx: Context) -> Iterator[Finding]:
    """The checkpoint is not quantized: no quantization config and no quantized tensors.

    Why: not a defect. vLLM and SGLang load it as a plain BF16/F16 model; quantgate reports it so a
    pipeline that expected a quantized export notices.

    Fix: nothing to fix; run `quantgate quantize` to produce an NVFP4 or FP8 export.
    """
    if ctx.qc is None and not ctx.a.is_quantized:
        yield finding("QG100", INFO, "Unquantized checkpoint: no quantization config and no quantized tensors; "
                      "engines load it as a plain model.")


@rule("QG101", "quantized-without-config", ERROR, per_engine=False)
def quantized_without_config(ctx: Context) -> Iterator[Finding]:
    """Quantized tensors are present but neither config.json nor hf_quant_config.json declares quantization.

    Why: invariant 1. Both engines build a BF16 model and fail on the first packed weight
    (size mismatch) or scale tensor ("There is no module or parameter named ...weight_scale").

    Fix: ship the exporter's `hf_quant_config.json` and `config.json` `quantization_config`.
    """
    if ctx.qc is None and ctx.a.is_quantized:
        sample = ctx.a.quantized_classes[0]
        yield finding("QG101", ERROR, f"{ctx.a.quantized_count} modules carry quantized tensors but no "
                      "quantization config was found.",
                      modules=[n for c in ctx.a.quantized_classes for n in c.names],
                      fix="Add the quantization config the exporter wrote (config.json quantization_config).",
                      effect=FAILS, error=f"ValueError: There is no module or parameter named "
                      f"'{sample.rep.name}.{next(iter(sample.state.scale_suffixes), 'weight_scale')}'")


@rule("QG102", "config-files-disagree", WARNING, per_engine=False)
def files_disagree(ctx: Context) -> Iterator[Finding]:
    """config.json `quantization_config` and hf_quant_config.json disagree (algo or exclude list).

    Why: invariant 1. vLLM and SGLang read config.json and silently ignore hf_quant_config.json, so
    tools that read the other file (and humans) see a different exclude list than the engine applies.

    Fix: regenerate both from one source or delete the stale hf_quant_config.json.
    """
    yield from (f for f in ctx.qc_findings if f.code == "QG102")


@rule("QG103", "malformed-config", ERROR, per_engine=False)
def malformed(ctx: Context) -> Iterator[Finding]:
    """A quantization config value has the wrong type or is missing (quant_algo, exclude list, groups).

    Why: invariant 2/3. vLLM `from_config` raises ValueError at startup ("Cannot find 'quant_algo'
    ...", exclude list not a list, group_size not int-like); compressed-tensors validates with pydantic.

    Fix: rewrite the config as the exporter produces it; see the message for the key.
    """
    yield from (f for f in ctx.qc_findings if f.code == "QG103")


@rule("QG104", "unsupported-algo", ERROR)
def unsupported_algo(ctx: Context) -> Iterator[Finding]:
    """The declared quant algo / format is not one the engine loads.

    Why: invariant 2. vLLM accepts ModelOpt {FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4,
    W4A16_NVFP4, MXFP8, MIXED_PRECISION} from config.json, but a legacy hf_quant_config.json-only
    checkpoint only the FP8 family or NVFP4 ("Unknown ModelOpt quant algo: X"); SGLang's
    ModelOptFp4Config accepts exactly FP8 or NVFP4. quant_methods quantgate does not model are QG190's.

    Fix: export with a supported algo, or write config.json `quantization_config` (flat form).
    """
    qc = ctx.qc
    if qc is None or qc.dialect not in DIALECTS:
        return      # other modelled dialects check their config while parsing (QG103); unmodelled: QG190
    if qc.is_ct:
        if qc.ct_format and qc.ct_format not in CT_FORMATS:
            yield finding("QG104", ERROR, f"compressed-tensors format {qc.ct_format!r} is not supported",
                          fix="Use a format compressed-tensors defines.", effect=FAILS,
                          error=f"ValueError: {qc.ct_format!r} is not a valid CompressionFormat")
        return
    algo = qc.quant_algo
    if algo is None:
        return
    if ctx.engine == "vllm":
        legacy = qc.source == "hf_quant_config.json"
        allowed = VLLM_LEGACY_ALGOS if legacy else VLLM_ALGOS
        if algo not in allowed:
            err = (f"ValueError: Unknown ModelOpt quant algo: {algo}" if legacy else
                   f"ValueError: ModelOpt currently only supports: {sorted(VLLM_ALGOS)}")
            where = "hf_quant_config.json (legacy path)" if legacy else "config.json"
            yield finding("QG104", ERROR, f"vLLM does not accept quant_algo {algo!r} from {where}",
                          fix="Write config.json quantization_config (flat form, quant_method modelopt)"
                          if legacy and algo in VLLM_ALGOS else "Export with a supported quant_algo.",
                          effect=FAILS, error=err)
    elif algo not in SGLANG_ALGOS:
        yield finding("QG104", ERROR, f"SGLang does not accept ModelOpt quant_algo {algo!r} (FP8 or NVFP4 only)",
                      fix="Export NVFP4 or FP8 for SGLang.", effect=FAILS,
                      error=f"ValueError: ModelOpt only supports FP8 and NVFP4, got {algo}")
    kv = qc.kv_cache_quant_algo
    if kv is not None and kv not in KV_ALGOS:
        yield finding("QG104", ERROR, f"kv_cache_quant_algo {kv!r} is not supported (FP8, NVFP4)",
                      fix="Use kv_cache_quant_algo FP8 or null.", effect=FAILS,
                      error=f"ValueError: Unsupported kv_cache_quant_algo {kv}")


@rule("QG105", "nvfp4-required-keys", ERROR, per_engine=False)
def nvfp4_keys(ctx: Context) -> Iterator[Finding]:
    """An NVFP4 config lacks keys vLLM requires, or its group_size is not 16.

    Why: invariant 3. `ModelOptNvFp4Config._from_config` raises "NVFP4 quantization requires the
    following fields in hf_quant_config.json: [...]"; kernels assume 16-element blocks.

    Fix: write group_size 16, kv_cache_quant_algo (may be null) and exclude_modules.
    """
    yield from (f for f in ctx.qc_findings if f.code == "QG105")
    qc = ctx.qc
    if qc is not None and qc.is_modelopt and qc.quant_algo in ("NVFP4", "W4A16_NVFP4") and \
            qc.group_size not in (None, NVFP4_GROUP_SIZE):
        yield finding("QG105", ERROR, f"NVFP4 group_size is {qc.group_size}; NVFP4 kernels need 16",
                      modules=[qc.source], fix="Export with group_size 16.", effect=FAILS,
                      error="ValueError: NVFP4 group_size must be 16")


@rule("QG106", "declared-scheme-contradicts-bytes", ERROR, per_engine=False)
def scheme_contradicts(ctx: Context) -> Iterator[Finding]:
    """The tensors are in a different scheme than the config declares (e.g. weight-only NVFP4 data
    under an NVFP4 W4A4 claim, or FP8 tensors under an NVFP4 claim).

    Why: invariant 4. vLLM builds the declared scheme's parameters: weight-only NVFP4 under NVFP4
    leaves every `input_scale` uninitialised -> experts output zeros (vllm#54189); other mismatches
    fail with size mismatches or KeyError on the scale names.

    Fix: declare the scheme the bytes hold (W4A16_NVFP4 for weight-only NVFP4) or re-export.
    """
    if not ctx.a.active:
        return
    found: dict[str, list[str]] = {}
    declared_names: set[str] = set()
    partial = 0
    for c in ctx.a.quantized_classes:
        st = c.state
        allowed = ctx.a.declared(c.rep, c.rep.name)
        if st.scheme is None or not allowed:
            continue
        declared_names.update(s.name for s in allowed)
        if st.scheme in allowed:
            continue
        if not set(st.scheme.suffixes) - {t for s in allowed for t in s.suffixes}:
            partial += len(c.members)      # a subset of the declared tensor set: QG301 names what is missing
        found.setdefault(st.scheme.name, []).extend(c.names)
    total = ctx.a.quantized_count
    for name, modules in sorted(found.items()):
        every = len(modules) == total
        if not every and partial:
            continue
        weight_only = "WEIGHT_ONLY" in name.upper() or "A16" in name.upper()
        effect = LOADS_WRONG if weight_only else FAILS
        error = ("silent: uninitialised input_scale folded into every GEMM (vllm#54189)" if weight_only
                 else f"RuntimeError: size mismatch loading {name} tensors into {sorted(declared_names)} parameters")
        yield finding("QG106", ERROR, f"{'All' if every else len(modules)} quantized modules hold {name} data but the "
                      f"config declares {sorted(declared_names)}", modules=modules,
                      fix=f"Declare the scheme the tensors hold ({name}) or re-export.", effect=effect, error=error)
