"""GPTQ and AWQ: config parsing and how each engine decides which modules it builds quantized.

Sources (reference formats_beyond_two.md §1, §4, §5, §7; vLLM files cited per function):

* GPTQ (`quant_method: gptq`, AutoGPTQ / GPTQModel / AutoRound). vLLM `gptq_marlin.py`
  `GPTQMarlinConfig.from_config` needs `bits`, `group_size`, `desc_act`, `sym` (`get_from_keys`:
  "Cannot find any of ['bits'] in the model's quantization config."); Marlin needs (bits, sym) in
  {(4, True), (8, True)}, else plain `gptq` (2/3/4/8 bits). Linear: quantized iff an entry of
  `modules_in_block_to_quantize` is a *substring* of the prefix (fused layers per shard, shards must
  agree) - when the config has no list, `maybe_update_config` derives it from the safetensors header
  (modules with any non-float tensor) - and no `dynamic` `-:regex` matches (`re.match`, first rule
  wins, `gptq_utils.get_dynamic_override`). MoE: only a `-:` rule matching the FusedMoE prefix
  (`model.layers.N.mlp.experts`) builds it unquantized; when Marlin does not support the layer
  (`marlin_utils.check_moe_marlin_supports_layer`: hidden % 128, intermediate % max(64, group),
  group in {-1, 32, 64, 128}) vLLM falls back to `moe_wna16`, which ignores `dynamic`.
  SGLang `gptq.py` (mid-2025): Linear `-:` rules only; FusedMoE always quantized.
* AWQ (`quant_method: awq`). vLLM `awq_marlin.py`: `modules_to_not_convert` is a substring test for
  Linear (per shard) and for the FusedMoE prefix; when absent or empty it is derived from the header
  as the modules whose tensors are all float - per-expert names, which never contain the FusedMoE
  prefix. SGLang `awq.py`: Linear substring; FusedMoE never excluded (PR #20439 closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quantgate.validators.findings import Finding
from quantgate.validators.quant_config import QuantConfig, _as_int, _as_str_list, _finding
from quantgate.validators.schemes import AWQ, GPTQ

#: (bits, sym) pairs vLLM's gptq_marlin accepts (`GPTQMarlinConfig.TYPE_MAP`)
GPTQ_MARLIN_TYPES: frozenset[tuple[int, bool]] = frozenset({(4, True), (8, True)})
#: bits plain vLLM `gptq` accepts (`gptq_utils.override_config`)
GPTQ_BITS: frozenset[int] = frozenset({2, 3, 4, 8})
#: bits vLLM `awq` / `awq_marlin` accept ("only 4-bit weight quantization is supported for AWQ")
AWQ_BITS: frozenset[int] = frozenset({4})
#: group sizes the Marlin kernels take (`marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES`)
MARLIN_GROUPS: frozenset[int] = frozenset({-1, 32, 64, 128})
MARLIN_MOE_HIDDEN_ALIGN = 128
MARLIN_MOE_INTERMEDIATE_ALIGN = 64
#: keys vLLM reads with `get_from_keys` (alternatives per key): missing -> ValueError at startup
GPTQ_REQUIRED: tuple[tuple[str, ...], ...] = (("bits",), ("group_size",), ("desc_act",))
AWQ_REQUIRED: tuple[tuple[str, ...], ...] = (("w_bit", "bits"), ("q_group_size", "group_size"), ("zero_point",))
#: vLLM `is_layer_gptq_quantized` default when the list is empty after derivation
GPTQ_DEFAULT_QUANTIZED: tuple[str, ...] = ("self_attn.qkv_proj", "self_attn.o_proj")
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32"})


@dataclass(frozen=True)
class DynamicRule:
    """One GPTQModel `dynamic` entry: `-:regex` skips, `+:regex` (or bare) overrides bits/group_size/..."""

    raw: str
    pattern: str
    negative: bool
    overrides: Mapping[str, Any]
    regex: re.Pattern[str] | None       # None when the pattern does not compile (QG103)

    def matches(self, prefix: str) -> bool:
        return self.regex is not None and self.regex.match(prefix) is not None


@dataclass
class WNA16Params:
    """The GPTQ / AWQ settings that decide what the engines build."""

    method: str                                     # GPTQ | AWQ
    bits: int | None
    group_size: int | None
    desc_act: bool | None = None
    sym: bool | None = None
    zero_point: bool | None = None
    lm_head: bool = False
    modules_in_block_to_quantize: list[str] | None = None   # flattened; None when absent
    modules_to_not_convert: list[str] | None = None         # AWQ; None when absent
    dynamic: tuple[DynamicRule, ...] = ()
    missing: tuple[str, ...] = ()                   # required keys absent (vLLM raises)
    raw_method: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def marlin_compatible(self) -> bool:
        """vLLM picks gptq_marlin / awq_marlin (else plain gptq / awq)."""
        if self.missing or self.bits is None or self.group_size is None:
            return False
        if self.method == GPTQ:
            return (self.bits, bool(self.sym)) in GPTQ_MARLIN_TYPES and self.group_size in MARLIN_GROUPS
        return self.bits in AWQ_BITS and self.group_size in MARLIN_GROUPS and bool(self.zero_point)

    def engine_method(self) -> str:
        return f"{self.method}_marlin" if self.marlin_compatible else self.method

    def first_rule(self, prefix: str) -> DynamicRule | None:
        """`get_dynamic_override`: the first `dynamic` rule whose regex `re.match`es the prefix."""
        return next((r for r in self.dynamic if r.matches(prefix)), None)

    def override(self, prefix: str, key: str, default: Any) -> Any:
        rule = self.first_rule(prefix)
        if rule is None or rule.negative:
            return default
        value = rule.overrides.get(key, default)
        return value if value is not None else default

    def skipped_by_dynamic(self, prefix: str) -> DynamicRule | None:
        rule = self.first_rule(prefix)
        return rule if rule is not None and rule.negative else None


def marlin_moe_supported(hidden: int | None, intermediate: int | None, group: int | None) -> tuple[bool, str]:
    """`check_moe_marlin_supports_layer` (TP 1): (supported, why not)."""
    if hidden is None or intermediate is None or group is None:
        return True, ""
    if group not in MARLIN_GROUPS:
        return False, f"group_size {group} not in {sorted(MARLIN_GROUPS)}"
    if hidden % MARLIN_MOE_HIDDEN_ALIGN:
        return False, f"hidden_size {hidden} % {MARLIN_MOE_HIDDEN_ALIGN} != 0"
    align = max(MARLIN_MOE_INTERMEDIATE_ALIGN, group)
    if intermediate % align:
        return False, f"moe intermediate size {intermediate} % {align} != 0"
    return True, ""


def substring_hit(prefix: str, entries: Iterable[str]) -> str | None:
    """vLLM `is_layer_skipped(..., skip_with_substr=True)` / `is_layer_gptq_quantized`: `entry in prefix`."""
    return next((e for e in entries if e and e in prefix), None)


class SubstringIndex:
    """`substring_hit` for long lists (the header-derived list names every quantized module: 45k in a
    DeepSeek-V3-sized GPTQ export): every window of the prefix is looked up by length, so a query
    costs O(len(prefix)^2) set lookups instead of O(len(entries)) scans."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = [e for e in entries if e]
        self.by_length: dict[int, set[str]] = {}
        for e in self.entries:
            self.by_length.setdefault(len(e), set()).add(e)

    def hit(self, prefix: str) -> str | None:
        for length in sorted(self.by_length):
            if length > len(prefix):
                break
            bucket = self.by_length[length]
            for i in range(len(prefix) - length + 1):
                if prefix[i:i + length] in bucket:
                    return prefix[i:i + length]
        return None


def derived_quantized(tensors: Mapping[str, Any]) -> list[str]:
    """GPTQ `maybe_update_config`: modules with any non-float tensor (checkpoint names)."""
    return sorted({n.rpartition(".")[0] for n, t in tensors.items() if t.dtype not in FLOAT_DTYPES})


def derived_not_convert(tensors: Mapping[str, Any]) -> list[str]:
    """AWQ `maybe_update_config`: modules whose tensors are all float (layers - quantized layers)."""
    layers = {n.rpartition(".")[0] for n in tensors}
    return sorted(layers - set(derived_quantized(tensors)))


# ---- parsing -------------------------------------------------------------------------------------
def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _first(data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[bool, Any]:
    for key in keys:
        if key in data:
            return True, data[key]
    return False, None


def _dynamic(value: Any, source: str, findings: list[Finding]) -> tuple[DynamicRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        findings.append(_finding("QG103", f"{source}: `dynamic` must be an object of regex -> overrides",
                                 'Write `dynamic` as {"-:regex": {}, "+:regex": {"bits": 8}}.',
                                 error="AttributeError: 'list' object has no attribute 'items'"))
        return ()
    rules: list[DynamicRule] = []
    for raw, overrides in value.items():
        negative = raw.startswith("-:")
        pattern = raw[2:] if raw.startswith(("-:", "+:")) else raw
        try:
            regex: re.Pattern[str] | None = re.compile(pattern)
        except re.error as exc:
            regex = None
            findings.append(_finding("QG103", f"{source}: `dynamic` rule {raw!r:.80} is not a valid regex ({exc})",
                                     "Fix the regular expression (Python `re` syntax).",
                                     error=f"re.error: {exc}"))
        rules.append(DynamicRule(raw, pattern, negative, overrides if isinstance(overrides, dict) else {}, regex))
    return tuple(rules)


def _flatten(value: Any, key: str, source: str, findings: list[Finding]) -> list[str] | None:
    """`modules_in_block_to_quantize`: a list, or a list of lists (flattened, as vLLM does)."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        value = [item for sub in value for item in sub]
    return _as_str_list(value, key, source, findings)


def _common(data: dict, method: str, required: tuple[tuple[str, ...], ...], source: str,
            findings: list[Finding]) -> WNA16Params:
    missing = tuple(keys[0] for keys in required if not _first(data, keys)[0])
    if missing:
        findings.append(_finding(
            "QG103", f"{source}: {method} config lacks required keys {list(missing)}",
            "Write the keys the quantizer writes (bits, group_size, desc_act/zero_point, sym).",
            error=f"ValueError: Cannot find any of {[missing[0]]} in the model's quantization config."))
    bits, ok_bits = _as_int(_first(data, ("w_bit", "bits"))[1])
    group, ok_group = _as_int(_first(data, ("q_group_size", "group_size"))[1])
    if not (ok_bits and ok_group):
        findings.append(_finding("QG103", f"{source}: {method} `bits` / `group_size` must be integers",
                                 "Write integer bits (4/8) and group_size (e.g. 128, or -1).",
                                 error="ValueError: invalid literal for int()"))
    return WNA16Params(method=method, bits=bits, group_size=group, missing=missing,
                       lm_head=bool(data.get("lm_head", False)), raw_method=str(data.get("quant_method", "")))


def parse_gptq(data: dict, source: str, findings: list[Finding]) -> QuantConfig:
    """`quantization_config` with quant_method gptq (or gptq_marlin)."""
    params = _common(data, GPTQ, GPTQ_REQUIRED, source, findings)
    params.desc_act = _bool(data.get("desc_act"))
    params.sym = _bool(data.get("sym"))
    params.modules_in_block_to_quantize = _flatten(data.get("modules_in_block_to_quantize"),
                                                   "modules_in_block_to_quantize", source, findings)
    params.dynamic = _dynamic(data.get("dynamic"), source, findings)
    params.extra = {k: data[k] for k in ("checkpoint_format", "quantizer", "meta") if k in data}
    return _config(GPTQ, params, data, source)


def parse_awq(data: dict, source: str, findings: list[Finding]) -> QuantConfig:
    """`quantization_config` with quant_method awq (or awq_marlin)."""
    params = _common(data, AWQ, AWQ_REQUIRED, source, findings)
    params.zero_point = _bool(data.get("zero_point"))
    params.modules_to_not_convert = (None if data.get("modules_to_not_convert") is None else _as_str_list(
        data.get("modules_to_not_convert"), "modules_to_not_convert", source, findings))
    params.extra = {k: data[k] for k in ("version",) if k in data}
    return _config(AWQ, params, data, source)


def _config(dialect: str, params: WNA16Params, data: dict, source: str) -> QuantConfig:
    # `exclude` stays empty: ModelOpt-style matching must never read these lists (their own rules do)
    return QuantConfig(dialect=dialect, quant_algo=None, source=source, exclude=[],
                       group_size=params.group_size, kv_cache_quant_algo=None, quantized_layers=None,
                       config_groups=None, raw=data, form=dialect, params=params)


def declared(qc: QuantConfig, module: Any, engine_name: str) -> list:
    """The scheme specs the config promises for a module the engine quantizes (per-module `bits`
    overrides from `dynamic` `+:` rules, matched on the engine prefix like vLLM)."""
    from quantgate.validators.schemes import SCHEMES

    params: WNA16Params = qc.params
    bits = params.override(engine_name, "bits", params.bits)
    return [s for s in SCHEMES if s.dialect == qc.dialect and s.weight_bits == bits]
