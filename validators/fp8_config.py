"""The Hugging Face native `fp8` dialect's config: `quant_method: "fp8"` in config.json.

What the engines read (reference formats_beyond_two.md §2, vLLM `quantization/fp8.py::Fp8Config`,
SGLang `layers/quantization/fp8.py`): `activation_scheme` (required, "static" | "dynamic"), optional
`weight_block_size` [b0, b1] (two dims, dynamic activations only), and the exclusion lists
`ignored_layers`, else `modules_to_not_convert` (names, no wildcards). `fmt` is ignored.

Real configs: DeepSeek-V3/R1 `{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
"weight_block_size": [128, 128]}` (no exclusion list: its router is BF16 by construction);
Qwen3-30B-A3B-FP8 adds `modules_to_not_convert` with exact names (lm_head, every `mlp.gate`, norms).

Malformed values become QG103 findings with the engines' own startup errors; parsing never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantgate.validators.findings import Finding
from quantgate.validators.quant_config import QuantConfig, _as_str_list, _finding
from quantgate.validators.schemes import FP8_NATIVE, SchemeSpec, fp8_native_for

ACTIVATION_SCHEMES: tuple[str, ...] = ("static", "dynamic")
#: the exclusion keys both engines read, in order: the first non-empty list wins (vLLM
#: `Fp8Config.from_config`: `ignored_layers`, and only when that is empty `modules_to_not_convert`)
EXCLUSION_KEYS: tuple[str, ...] = ("ignored_layers", "modules_to_not_convert")


@dataclass(frozen=True)
class Fp8Settings:
    """What an fp8 config declares, as the engines read it."""

    activation_scheme: str | None            # "static" | "dynamic" | None (missing or invalid: QG103)
    weight_block_size: tuple[int, int] | None
    ignored_layers: tuple[str, ...]
    modules_to_not_convert: tuple[str, ...]

    @property
    def static(self) -> bool:
        return self.activation_scheme == "static"

    @property
    def exclusions(self) -> tuple[str, ...]:
        """The list the engines apply: `ignored_layers`, else `modules_to_not_convert`."""
        return self.ignored_layers or self.modules_to_not_convert

    @property
    def exclusion_key(self) -> str:
        return "ignored_layers" if self.ignored_layers else "modules_to_not_convert"

    @property
    def label(self) -> str:
        """How messages name what the config declares ("fp8 block 128x128", "fp8 per-tensor static")."""
        if self.weight_block_size:
            return f"fp8 block {self.weight_block_size[0]}x{self.weight_block_size[1]}"
        return f"fp8 per-tensor {self.activation_scheme or 'dynamic'}"

    def declared(self) -> list[SchemeSpec]:
        """The scheme the engines build for every quantized module (both per-tensor forms when the
        activation scheme is unreadable, so the bytes decide)."""
        if self.weight_block_size:
            return [fp8_native_for(self.weight_block_size)]
        if self.activation_scheme is None:
            return [fp8_native_for(None, False), fp8_native_for(None, True)]
        return [fp8_native_for(None, self.static)]


def _activation_scheme(data: dict, source: str, findings: list[Finding]) -> str | None:
    value = data.get("activation_scheme")
    if value is None:
        findings.append(_finding(
            "QG103", f"{source}: fp8 quantization_config has no `activation_scheme`",
            'Add `"activation_scheme": "dynamic"` (block fp8) or "static" (per-tensor with input_scale).',
            error="ValueError: Cannot find any of ['activation_scheme'] in the model's quantization config."))
        return None
    if value not in ACTIVATION_SCHEMES:
        findings.append(_finding(
            "QG103", f"{source}: fp8 `activation_scheme` is {value!r:.40}; the engines accept static or dynamic",
            'Set `activation_scheme` to "dynamic" or "static".',
            error=f"ValueError: Unsupported activation scheme {value}"))
        return None
    return str(value)


def _block_size(data: dict, scheme: str | None, source: str, findings: list[Finding]) -> tuple[int, int] | None:
    value = data.get("weight_block_size")
    if value is None:
        return None
    dims = value if isinstance(value, list) else []
    if len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        n = len(value) if isinstance(value, list) else 0
        findings.append(_finding(
            "QG103", f"{source}: fp8 `weight_block_size` must be two positive integers, got {value!r:.60}",
            "Write `weight_block_size` as [128, 128] (rows, columns of one weight block).",
            error=f"ValueError: The quantization block size of weight must have 2 dimensions, but got {n} dimensions"))
        return None
    if scheme == "static":
        findings.append(_finding(
            "QG103", f"{source}: fp8 block quantization with static activations; the engines only build "
            "dynamic activations for blocks",
            'Set `"activation_scheme": "dynamic"` (block fp8 quantizes activations per token group at run time).',
            error="ValueError: The block-wise quantization only supports dynamic activation scheme for now, but "
                  "got static activation scheme."))
    return dims[0], dims[1]


def parse(data: dict[str, Any], source: str, findings: list[Finding]) -> QuantConfig:
    """`quantization_config` with quant_method "fp8" -> QuantConfig(dialect="fp8", params=Fp8Settings)."""
    scheme = _activation_scheme(data, source, findings)
    block = _block_size(data, scheme, source, findings)
    ignored = _as_str_list(data.get("ignored_layers"), "ignored_layers", source, findings)
    not_convert = _as_str_list(data.get("modules_to_not_convert"), "modules_to_not_convert", source, findings)
    settings = Fp8Settings(scheme, block, tuple(ignored), tuple(not_convert))
    return QuantConfig(dialect=FP8_NATIVE, quant_algo=None, source=source, exclude=list(settings.exclusions),
                       group_size=block[1] if block else None, kv_cache_quant_algo=None, quantized_layers=None,
                       config_groups=None, raw=data, form="fp8", params=settings)


def declared(qc: QuantConfig, module: Any, engine_name: str) -> list[SchemeSpec]:
    """Registry hook (validators/dialects.py): native fp8 promises the same scheme for every module
    the engine quantizes; exclusions are matched by the engines' own rules (fp8_engines.py)."""
    return qc.params.declared() if isinstance(qc.params, Fp8Settings) else []
