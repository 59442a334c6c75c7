"""OpenAI's `mxfp4` (GPT-OSS): config parsing and the facts the engines hold about it.

Sources: reference formats_beyond_two.md §1, §3. vLLM `quantization/mxfp4.py`: `Mxfp4Config.from_config`
returns `cls()` - `modules_to_not_convert` is never read; every Linear gets `UnquantizedLinearMethod`
("MXFP4 linear layer is not implemented"); every FusedMoE gets `Mxfp4MoEMethod` (no MoE exclusion at
all). SGLang `mxfp4.py` (Aug 2025): the same. `models/gpt_oss.py::_load_weights_mxfp4` views
`w13_weight` as [E, 2I, -1] and copies; names it does not know are skipped with a warning.

On disk, per MoE layer, six fused tensors (`<moe>.experts.` + name):
`gate_up_proj_blocks` U8 [E, 2I, H/32, 16], `gate_up_proj_scales` U8 (E8M0) [E, 2I, H/32],
`gate_up_proj_bias` BF16 [E, 2I], `down_proj_blocks` U8 [E, H, I/32, 16], `down_proj_scales` U8 [E, H, I/32],
`down_proj_bias` BF16 [E, H]; gate/up rows interleaved. Everything else stays BF16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantgate.validators.findings import Finding
from quantgate.validators.quant_config import QuantConfig, _as_str_list
from quantgate.validators.schemes import MXFP4

if TYPE_CHECKING:
    from quantgate.validators.layout import Module

#: E8M0 exponent byte that encodes NaN (OCP MX spec; every other byte is 2**(b - 127))
E8M0_NAN = 0xFF
#: fused expert tensors per MoE layer: name -> (stored dtypes, shape from (E, I, H))
FUSED_TENSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gate_up_proj_blocks": (("U8",), ("E", "2I", "H/32", "16")),
    "gate_up_proj_scales": (("U8",), ("E", "2I", "H/32")),
    "gate_up_proj_bias": (("BF16", "F32", "F16"), ("E", "2I")),
    "down_proj_blocks": (("U8",), ("E", "H", "I/32", "16")),
    "down_proj_scales": (("U8",), ("E", "H", "I/32")),
    "down_proj_bias": (("BF16", "F32", "F16"), ("E", "H")),
}
#: what a missing fused tensor leaves behind in the engine (nothing checks it was loaded, §7)
MISSING_EFFECT: dict[str, str] = {
    "blocks": "the MXFP4 expert weights stay uninitialised",
    "scales": "w13/w2_weight_scale stay zero (E8M0 0 = 2**-127): every expert outputs ~0",
    "bias": "w13/w2_bias stay zero: every expert loses its bias",
}


@dataclass
class Mxfp4Params:
    modules_to_not_convert: list[str] | None    # read by transformers only; both engines ignore it


def dims(symbolic: tuple[str, ...], experts: int, intermediate: int, hidden: int) -> tuple[int, ...]:
    """Resolve ("E", "2I", "H/32", "16") against the config's sizes."""
    values = {"E": experts, "I": intermediate, "2I": 2 * intermediate, "H": hidden,
              "H/32": hidden // 32, "I/32": intermediate // 32, "16": 16}
    return tuple(values[s] for s in symbolic)


def parse_mxfp4(data: dict, source: str, findings: list[Finding]) -> QuantConfig:
    """`quantization_config` with quant_method mxfp4."""
    raw = data.get("modules_to_not_convert")
    params = Mxfp4Params(None if raw is None else _as_str_list(raw, "modules_to_not_convert", source, findings))
    return QuantConfig(dialect=MXFP4, quant_algo=None, source=source, exclude=[], group_size=32,
                       kv_cache_quant_algo=None, quantized_layers=None, config_groups=None, raw=data,
                       form=MXFP4, params=params)


def declared(qc: QuantConfig, module: "Module", engine_name: str) -> list:
    """MXFP4 is only ever declared for routed experts (every FusedMoE); Linear stays BF16."""
    from quantgate.validators.schemes import SCHEMES

    if getattr(module.kind, "value", module.kind) != "expert":
        return []
    return [s for s in SCHEMES if s.dialect == MXFP4]
