"""Which modules calibration observes, and where they live in the transformers runtime model.

Targets are named as on disk (the layout's names). The runtime model of transformers v5 can differ:
Qwen3-MoE / DeepSeek-V3 / Mixtral keep per-expert tensors on disk but one fused experts module at
run time (Mixtral even renames `block_sparse_moe` to `mlp`), and Gemma4's fused on-disk experts are
exposed by the layout as virtual per-expert modules. Binding is therefore:

1. a runtime `nn.Linear` with the target's exact name;
2. for an expert target (layout kind `expert`, with layer, expert and role): the runtime experts
   module of the same decoder layer, input `gate_up` for roles gate/up/gate_up, `down` for down
   (`runtime_expert_key`);
3. transformers' own checkpoint renaming (the rules `from_pretrained` applied) for a Linear whose
   on-disk name differs from its runtime name.
No model-family branches: the layout supplies layer / expert / role, transformers the renames.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

EXPERT_KIND = "expert"
# canonical expert role -> which input of a fused experts module feeds that projection
EXPERT_INPUT_BY_ROLE: dict[str, str] = {
    "gate": "gate_up",
    "up": "gate_up",
    "gate_up": "gate_up",
    "down": "down",
}
# fallback when no layout is available: on-disk projection name -> canonical role
ROLE_BY_PROJECTION: dict[str, str] = {
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "down_proj": "down",
    "w2": "down",
    "gate_up_proj": "gate_up",
}
_EXPERT_NAME = re.compile(r"^(?P<group>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.")


@dataclass(frozen=True)
class Target:
    """A module whose input amax calibration must record (fields as in validators.layout.Module)."""

    name: str
    kind: str | None
    layer: int | None
    expert: int | None
    role: str | None
    fused_group: str | None = None
    moe_group: str | None = None

    @property
    def is_expert(self) -> bool:
        return self.kind == EXPERT_KIND and self.expert is not None and self.role in EXPERT_INPUT_BY_ROLE


def _kind_value(kind: Any) -> str | None:
    return None if kind is None else str(getattr(kind, "value", kind)).lower()


def target_from_module(module: Any) -> Target:
    """From a `quantgate.validators.layout.Module` (duck-typed so this file does not depend on its import)."""
    return Target(
        module.name,
        _kind_value(module.kind),
        module.layer,
        module.expert,
        module.role,
        getattr(module, "fused_group", None),
        getattr(module, "moe_group", None),
    )


def target_from_name(name: str) -> Target:
    """Best effort without a layout: `...layers.N....experts.E.<proj>` is an expert, else a Linear."""
    layer_match = _LAYER.search(name)
    layer = int(layer_match["layer"]) if layer_match else None
    match = _EXPERT_NAME.match(name)
    if match and match["proj"] in ROLE_BY_PROJECTION:
        return Target(
            name,
            EXPERT_KIND,
            layer,
            int(match["expert"]),
            ROLE_BY_PROJECTION[match["proj"]],
            moe_group=match["group"],
        )
    return Target(name, None, layer, None, None)


def resolve_targets(targets: Any, layout: Any | None = None) -> list[Target]:
    """Targets from a Plan (modules with a scheme that needs static input scales) or module names.

    With a layout, each name takes the layout's kind / layer / expert / role; names the layout does
    not know (and calls without a layout) fall back to `target_from_name`.
    """
    assignments = getattr(targets, "assignments", None)
    if assignments is not None:
        names = [
            name
            for name, a in assignments.items()
            if a.scheme is not None and getattr(a.scheme, "activation_scales", True)
        ]
    elif isinstance(targets, str):
        names = [targets]
    else:
        names = list(targets)
    modules: Mapping[str, Any] = getattr(layout, "modules", None) or {}
    out = []
    for name in dict.fromkeys(names):
        module = modules.get(name)
        out.append(target_from_module(module) if module is not None else target_from_name(name))
    return out


def runtime_expert_key(layer: int, kind: str, expert: int, role: str) -> tuple[int, int, str]:
    """(layer, expert, input) a fused runtime experts module is looked up by; input is gate_up|down."""
    if kind != EXPERT_KIND or role not in EXPERT_INPUT_BY_ROLE:
        raise ValueError(f"not a routed-expert projection: kind={kind!r} role={role!r}")
    return layer, expert, EXPERT_INPUT_BY_ROLE[role]


@dataclass
class Binding:
    """Targets bound to runtime modules."""

    linears: dict[str, list[str]] = field(default_factory=dict)  # runtime Linear -> target names
    # runtime experts module -> (expert, input) -> target names
    experts: dict[str, dict[tuple[int, str], list[str]]] = field(default_factory=dict)
    unbound: list[str] = field(default_factory=list)


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def _runtime_name_via_conversions(model: nn.Module, name: str) -> str | None:
    """Apply the checkpoint renames transformers used when loading (`model._weight_conversions`)."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return None
    try:
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - transformers without the v5 loader
        return None
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    renamed, converter = rename_source_key(f"{name}.weight", renamings, converters)
    if converter is not None or not renamed.endswith(".weight"):
        return None
    return renamed[: -len(".weight")]


def bind_targets(
    model: nn.Module, targets: Iterable[Target], experts_modules: Mapping[str, nn.Module]
) -> Binding:
    """Bind every target to a runtime Linear or a runtime experts module (see the module docstring).

    experts_modules: runtime name -> fused experts module (every module calibration can observe per expert).
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_layer: dict[int, list[str]] = {}
    for name in experts_modules:
        layer_match = _LAYER.search(name + ".")
        if layer_match:
            by_layer.setdefault(int(layer_match["layer"]), []).append(name)
    binding = Binding()
    for target in targets:
        if target.name in linears:
            binding.linears.setdefault(target.name, []).append(target.name)
            continue
        if target.is_expert and target.layer is not None:
            candidates = [
                n
                for n in by_layer.get(target.layer, [])
                if target.expert < int(getattr(experts_modules[n], "num_experts", 0))
            ]
            if candidates:
                runtime = max(candidates, key=lambda n: _common_prefix_len(n, target.name))
                _, expert, which = runtime_expert_key(target.layer, EXPERT_KIND, target.expert, target.role)
                binding.experts.setdefault(runtime, {}).setdefault((expert, which), []).append(target.name)
                continue
        renamed = _runtime_name_via_conversions(model, target.name)
        if renamed is not None and renamed in linears:
            binding.linears.setdefault(renamed, []).append(target.name)
            continue
        binding.unbound.append(target.name)
    return binding
