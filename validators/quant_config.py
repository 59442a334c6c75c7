"""Quantization config parsing: ModelOpt (nested and flat) and compressed-tensors into one model.

Where the config is found follows vLLM (`transformers_utils/config.py::get_config`, reference
vllm_sglang.md §1): `config.json["quantization_config"]` (or its alias `compression_config`, or the
`text_config`'s for multimodal wrappers) wins; only when it is absent is `hf_quant_config.json`
used. Both present and disagreeing on the algo or the exclude list is reported (invariant 1).

Malformed values never raise: each becomes a `Finding` (codes QG103/QG105, documented in
`validators/rules/config.py`) and the parser keeps what it can, so the remaining rules still run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantgate.validators.findings import Finding, Severity, VerdictStatus

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
DIALECTS: tuple[str, ...] = (MODELOPT, COMPRESSED_TENSORS)

#: NVFP4 kernels assume 16-element blocks (vLLM `ModelOptNvFp4Config`, invariant 3).
NVFP4_GROUP_SIZE = 16
#: keys the nested (hf_quant_config.json) NVFP4 form must carry, values may be null (invariant 3).
NVFP4_NESTED_REQUIRED: tuple[str, ...] = ("group_size", "kv_cache_quant_algo", "exclude_modules")


@dataclass
class QuantConfig:
    """One quantization config, whatever file and dialect it came from."""

    dialect: str                            # "modelopt" | "compressed-tensors" | another quant_method
    quant_algo: str | None                  # modelopt algo, upper case; None for CT
    source: str                             # "config.json" | "hf_quant_config.json"
    exclude: list[str]                      # exclude_modules (modelopt) / ignore (CT)
    group_size: int | None
    kv_cache_quant_algo: str | None
    quantized_layers: dict[str, dict] | None    # MIXED_PRECISION map
    config_groups: dict | None              # CT (and ModelOpt's informational copy)
    raw: dict
    form: str = "flat"                      # "nested" (hf_quant_config.json shape) | "flat" | "ct"
    ct_format: str | None = None            # CT global `format`
    quantization_status: str | None = None  # CT
    kv_cache_scheme: dict | None = None     # CT / flat modelopt
    producer: dict | None = None
    other: dict[str, Any] = field(default_factory=dict)   # the other file's parse, for comparisons
    params: Any = None                      # a registered dialect's own settings (validators/dialects.py:
                                            # fp8 Fp8Settings, gptq/awq WNA16Params, mxfp4 Mxfp4Params)

    @property
    def is_modelopt(self) -> bool:
        return self.dialect == MODELOPT

    @property
    def is_ct(self) -> bool:
        return self.dialect == COMPRESSED_TENSORS


def _finding(code: str, message: str, fix: str, *, error: str = "", engines: tuple[str, ...] | None = None,
             severity: Severity = Severity.ERROR) -> Finding:
    kwargs: dict[str, Any] = {}
    if engines is not None:
        kwargs["engines"] = engines
    return Finding(code=code, severity=severity, message=message, fix=fix,
                   effect=VerdictStatus.FAILS if severity is Severity.ERROR else None,
                   predicted_error=error, **kwargs)


def _as_int(value: Any) -> tuple[int | None, bool]:
    """(value, ok): ints and integral floats/strings are accepted like vLLM's `int(...)`."""
    if value is None:
        return None, True
    if isinstance(value, bool):
        return None, False
    if isinstance(value, int):
        return value, True
    if isinstance(value, float) and value.is_integer():
        return int(value), True
    if isinstance(value, str):
        try:
            return int(value.strip()), True
        except ValueError:
            return None, False
    return None, False


def _as_str_list(value: Any, key: str, source: str, findings: list[Finding]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        findings.append(_finding(
            "QG103", f"{source}: `{key}` must be a list of module names, got {type(value).__name__}",
            f"Write `{key}` as a JSON list of module-name patterns.",
            error=f"ValueError: {key} must be a list"))
        return []
    out = [v for v in value if isinstance(v, str)]
    if len(out) != len(value):
        findings.append(_finding(
            "QG103", f"{source}: `{key}` has {len(value) - len(out)} non-string entries (ignored)",
            f"Keep only strings in `{key}`.", error="TypeError: expected string pattern"))
    return out


def _algo(value: Any, source: str, findings: list[Finding]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        findings.append(_finding("QG103", f"{source}: `quant_algo` must be a string, got {value!r:.60}",
                                 'Set `quant_algo` to a string such as "NVFP4" or "FP8".',
                                 error="ValueError: quant_algo must be a string"))
        return None
    return value.strip().upper()


def _group_size(value: Any, source: str, findings: list[Finding]) -> int | None:
    size, ok = _as_int(value)
    if not ok:
        findings.append(_finding("QG103", f"{source}: `group_size` is not an integer: {value!r:.60}",
                                 "Set `group_size` to an integer (16 for NVFP4).",
                                 error="ValueError: group_size must be an integer"))
    return size


def _opt_dict(value: Any, key: str, source: str, findings: list[Finding]) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):   # ModelOpt writes non-FP8 kv_cache_scheme as a raw string
        return {"type": value}
    findings.append(_finding("QG103", f"{source}: `{key}` must be an object, got {type(value).__name__}",
                             f"Write `{key}` as a JSON object or null.",
                             error=f"ValueError: invalid {key}"))
    return None


def _parse_modelopt_nested(data: dict, source: str, findings: list[Finding]) -> QuantConfig:
    """`{"producer": {...}, "quantization": {quant_algo, kv_cache_quant_algo, group_size, exclude_modules}}`."""
    quant = data.get("quantization")
    if not isinstance(quant, dict):
        findings.append(_finding("QG103", f"{source}: `quantization` must be an object",
                                 'Write `"quantization": {"quant_algo": ..., "exclude_modules": [...]}`.',
                                 error="ValueError: Cannot find 'quant_algo' in the model's quantization config."))
        quant = {}
    algo = _algo(quant.get("quant_algo"), source, findings)
    if algo is None:
        findings.append(_finding("QG103", f"{source}: `quantization.quant_algo` is missing",
                                 "Set `quant_algo` (NVFP4, FP8, ...) as written by the exporter.",
                                 error="ValueError: Cannot find 'quant_algo' in the model's quantization config."))
    if algo is not None and ("NVFP4" in algo or "FP4" in algo):
        missing = [k for k in NVFP4_NESTED_REQUIRED if k not in quant]
        if missing:
            findings.append(_finding(
                "QG105", f"{source}: NVFP4 config lacks required keys {missing}",
                "Add the keys (values may be null): " + ", ".join(NVFP4_NESTED_REQUIRED) + ".",
                error="ValueError: NVFP4 quantization requires the following fields in hf_quant_config.json: "
                      f"{list(NVFP4_NESTED_REQUIRED)}"))
    kv = quant.get("kv_cache_quant_algo")
    layers = quant.get("quantized_layers")
    return QuantConfig(
        dialect=MODELOPT, quant_algo=algo, source=source,
        exclude=_as_str_list(quant.get("exclude_modules"), "exclude_modules", source, findings),
        group_size=_group_size(quant.get("group_size"), source, findings),
        kv_cache_quant_algo=kv.upper() if isinstance(kv, str) else None,
        quantized_layers=_quantized_layers(layers, source, findings),
        config_groups=None, raw=data, form="nested",
        producer=data.get("producer") if isinstance(data.get("producer"), dict) else None)


def _quantized_layers(value: Any, source: str, findings: list[Finding]) -> dict[str, dict] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        findings.append(_finding("QG103", f"{source}: `quantized_layers` must be an object",
                                 "Write `quantized_layers` as {module: {quant_algo: ...}}.",
                                 error="ValueError: invalid quantized_layers"))
        return None
    out: dict[str, dict] = {}
    for name, spec in value.items():
        if isinstance(spec, dict) and isinstance(spec.get("quant_algo"), str):
            out[name] = {**spec, "quant_algo": spec["quant_algo"].upper()}
        else:
            findings.append(_finding("QG103", f"{source}: `quantized_layers[{name!r:.80}]` has no quant_algo",
                                     "Give every quantized_layers entry a quant_algo string.",
                                     error="ValueError: invalid quantized_layers entry"))
    return out


def _parse_modelopt_flat(data: dict, source: str, findings: list[Finding]) -> QuantConfig:
    """config.json form written by ModelOpt >= 0.31: quant_method "modelopt", quant_algo, ignore, ..."""
    algo = _algo(data.get("quant_algo"), source, findings)
    if algo is None:
        findings.append(_finding("QG103", f"{source}: `quant_algo` is missing from quantization_config",
                                 "Set `quant_algo` (NVFP4, FP8, ...) as written by the exporter.",
                                 error="ValueError: Cannot find 'quant_algo' in the model's quantization config."))
    key = "ignore" if "ignore" in data else "exclude_modules"
    groups = data.get("config_groups")
    group_size = _group_size(data.get("group_size"), source, findings)
    if group_size is None and isinstance(groups, dict):   # modelopt copies group_size into config_groups
        for group in groups.values():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict) and isinstance(weights.get("group_size"), int):
                group_size = weights["group_size"]
                break
    kv_scheme = _opt_dict(data.get("kv_cache_scheme"), "kv_cache_scheme", source, findings)
    kv_algo = data.get("kv_cache_quant_algo")
    if not isinstance(kv_algo, str) and kv_scheme:
        kind = str(kv_scheme.get("type", "")).lower()
        kv_algo = "FP8" if kind == "float" and kv_scheme.get("num_bits") == 8 else kind.upper() or None
    return QuantConfig(
        dialect=MODELOPT, quant_algo=algo, source=source,
        exclude=_as_str_list(data.get(key), key, source, findings), group_size=group_size,
        kv_cache_quant_algo=kv_algo.upper() if isinstance(kv_algo, str) else None,
        quantized_layers=_quantized_layers(data.get("quantized_layers"), source, findings),
        config_groups=groups if isinstance(groups, dict) else None, raw=data, form="flat",
        kv_cache_scheme=kv_scheme,
        producer=data.get("producer") if isinstance(data.get("producer"), dict) else None)


def _parse_ct(data: dict, source: str, findings: list[Finding]) -> QuantConfig:
    """compressed-tensors `quantization_config` (reference llmcompressor_and_services.md §A1)."""
    groups = data.get("config_groups")
    clean: dict[str, dict] = {}
    if not isinstance(groups, dict) or not groups:
        findings.append(_finding("QG103", f"{source}: compressed-tensors `config_groups` is missing or empty",
                                 "Write the config with compressed-tensors (llm-compressor's save_pretrained).",
                                 error="ValueError: invalid compressed-tensors config_groups"))
        groups = {}
    for gname, group in groups.items():
        if not isinstance(group, dict):
            findings.append(_finding("QG103", f"{source}: config group {gname!r:.60} is not an object",
                                     "Each config group holds targets, weights, input_activations.",
                                     error="ValueError: invalid config group"))
            continue
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            findings.append(_finding("QG103", f"{source}: config group {gname!r:.60} `targets` is not a list "
                                     "of strings", "List the group's targets (`Linear`, names or `re:` patterns).",
                                     error="ValueError: invalid targets"))
            continue
        for args_key in ("weights", "input_activations", "output_activations"):
            if group.get(args_key) is not None and not isinstance(group.get(args_key), dict):
                findings.append(_finding("QG103", f"{source}: config group {gname!r:.60} `{args_key}` must be an "
                                         "object or null", "Write QuantizationArgs as a JSON object.",
                                         error=f"ValidationError: {args_key}"))
                break
        else:
            clean[gname] = group
    fmt = data.get("format")
    status = data.get("quantization_status")
    return QuantConfig(
        dialect=COMPRESSED_TENSORS, quant_algo=None, source=source,
        exclude=_as_str_list(data.get("ignore"), "ignore", source, findings), group_size=None,
        kv_cache_quant_algo=None, quantized_layers=None, config_groups=clean, raw=data, form="ct",
        ct_format=fmt if isinstance(fmt, str) else None,
        quantization_status=status if isinstance(status, str) else None,
        kv_cache_scheme=_opt_dict(data.get("kv_cache_scheme"), "kv_cache_scheme", source, findings))


def _parse_one(data: Any, source: str, findings: list[Finding]) -> QuantConfig | None:
    if not isinstance(data, dict):
        findings.append(_finding("QG103", f"{source}: quantization config must be a JSON object",
                                 "Rewrite the quantization config as a JSON object.",
                                 error="ValueError: invalid quantization config"))
        return None
    method = data.get("quant_method")
    producer = data.get("producer")
    if method is None and isinstance(producer, dict) and producer.get("name") == MODELOPT or (
            method is None and "quantization" in data):
        return _parse_modelopt_nested(data, source, findings)
    if not isinstance(method, str):
        findings.append(_finding("QG103", f"{source}: quantization_config has no `quant_method`",
                                 'Set `quant_method` to "modelopt" or "compressed-tensors".',
                                 error="ValueError: quant_method missing"))
        return None
    method = method.strip().lower().replace("compressed_tensors", COMPRESSED_TENSORS)
    if method.startswith(MODELOPT):
        if "quantization" in data and "quant_algo" not in data:
            return _parse_modelopt_nested(data, source, findings)
        return _parse_modelopt_flat(data, source, findings)
    if method == COMPRESSED_TENSORS:
        return _parse_ct(data, source, findings)
    from quantgate.validators.dialects import parse_registered  # dialect modules build on this one

    parsed = parse_registered(method, data, source, findings)
    if parsed is not None:
        return parsed
    return QuantConfig(dialect=method, quant_algo=None, source=source, exclude=[], group_size=None,
                       kv_cache_quant_algo=None, quantized_layers=None, config_groups=None, raw=data)



def config_json_quant_section(config: dict | None) -> Any:
    """The quantization section vLLM reads from config.json (top level first, then `text_config`)."""
    if not isinstance(config, dict):
        return None
    for key in ("quantization_config", "compression_config"):
        if config.get(key) is not None:
            return config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        for key in ("quantization_config", "compression_config"):
            if text.get(key) is not None:
                return text[key]
    return None


def _disagreements(primary: QuantConfig, other: QuantConfig) -> list[str]:
    out = []
    if primary.dialect == other.dialect == MODELOPT and primary.quant_algo != other.quant_algo:
        out.append(f"quant_algo {primary.quant_algo!r} vs {other.quant_algo!r}")
    if primary.dialect != other.dialect:
        out.append(f"dialect {primary.dialect!r} vs {other.dialect!r}")
    if sorted(primary.exclude) != sorted(other.exclude):
        only_cfg = sorted(set(primary.exclude) - set(other.exclude))
        only_hf = sorted(set(other.exclude) - set(primary.exclude))
        out.append(f"exclude lists differ (only in config.json: {only_cfg[:5]}, only in hf_quant_config.json: "
                   f"{only_hf[:5]})")
    return out


def parse_quant_config(config: dict | None, hf_quant_config: dict | None
                       ) -> tuple[QuantConfig | None, list[Finding]]:
    """Parse the effective quantization config the way vLLM finds it; never raises."""
    findings: list[Finding] = []
    section = config_json_quant_section(config)
    primary: QuantConfig | None = None
    if section is not None:
        primary = _parse_one(section, "config.json", findings)
    secondary: QuantConfig | None = None
    if hf_quant_config is not None:
        target = findings if primary is None else []      # the ignored file's own problems do not matter
        secondary = _parse_one(hf_quant_config, "hf_quant_config.json", target)
    if primary is None:
        return secondary, findings
    if secondary is not None:
        primary.other = {"source": secondary.source, "quant_algo": secondary.quant_algo,
                         "exclude": secondary.exclude}
        diffs = _disagreements(primary, secondary)
        if diffs:
            findings.append(Finding(
                code="QG102", severity=Severity.WARNING,
                message="config.json quantization_config and hf_quant_config.json disagree: " + "; ".join(diffs)
                        + ". Engines use config.json and silently ignore hf_quant_config.json.",
                modules=("config.json", "hf_quant_config.json"),
                fix="Regenerate both files from one source (or delete the stale hf_quant_config.json).",
                details={"differences": diffs}))
    return primary, findings
