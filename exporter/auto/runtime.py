"""Where each layout module's weight lives in the transformers runtime model, as a writable view.

Scoring perturbs weights in place, so it needs, for every on-disk (layout) module, the `[out, in]`
matrix the runtime model multiplies by. Binding reuses calibration's (`calibration.targets.bind_targets`):
a runtime `nn.Linear` of the same name (or transformers' own rename), else the fused experts module
of the same decoder layer. For fused experts the view is taken inside the 3-D parameter:

* `gate_up_proj [E, 2I, H]` (`[E, H, 2I]` when the module says `is_transposed`: GPT-OSS, Llama4) and
  `down_proj [E, H, I]` (`[E, I, H]`), one expert at a time;
* gate / up are the two halves of the out dim, or its even / odd entries when the layout's
  `FusedSlice.interleaved` says so (GPT-OSS). Fused-on-disk layouts (Gemma4, GPT-OSS, Llama4) give
  the slice themselves; per-expert-on-disk ones (Qwen3-MoE, Mixtral, DeepSeek-V3), which
  transformers concatenates [gate; up] at load time, take it from the role.

Views share storage with the parameter: `view.copy_(x)` changes the model. The same slicing applied
to `param.grad` gives the module's gradient. Bindings are verified: every view must have the
module's logical shape, and, given the source, one module per (parameter, role) must equal the
checkpoint's bytes (this catches a swapped gate/up or a wrong transposition).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantgate.exporter.calibration.experts import DENSE_EXPERTS, find_experts_modules
from quantgate.exporter.calibration.targets import bind_targets, target_from_module
from quantgate.validators.errors import UnsupportedArchitectureError
from quantgate.validators.layout import Kind, Layout, Module

log = logging.getLogger(__name__)

#: Runtime parameter of a fused experts module per input it reads (gated modules).
EXPERT_PARAM: dict[str, str] = {"gate_up": "gate_up_proj", "down": "down_proj"}
#: ... and for experts without a gate (`has_gate` False): the first projection is `up_proj`.
UNGATED_EXPERT_PARAM: dict[str, str] = {"gate_up": "up_proj", "down": "down_proj"}
#: Which half of a gated first projection's out dim a role owns (index into [gate; up]).
HALF_BY_ROLE: dict[str, int] = {"gate": 0, "up": 1}


@dataclass(frozen=True)
class WeightRef:
    """One layout module's weight inside a runtime parameter."""

    module: str  # layout (on-disk) name
    kind: Kind
    fused_key: str  # the layout's fused_group, else the module name
    param: nn.Parameter
    expert: int | None  # index into a 3-D experts parameter
    transposed: bool  # the per-expert matrix is stored [in, out]
    half: int | None  # 0 gate / 1 up of a gated first projection, None = whole matrix
    interleaved: bool  # gate/up alternate along out (GPT-OSS)

    def select(self, tensor: Tensor) -> Tensor:
        """The [out, in] view of this module inside `tensor` (the parameter's data or its grad)."""
        matrix = tensor if self.expert is None else tensor[self.expert]
        if self.transposed:
            matrix = matrix.t()
        if self.half is not None:
            if self.interleaved:
                matrix = matrix[self.half :: 2]
            else:
                rows = matrix.shape[0] // 2
                matrix = matrix[self.half * rows : (self.half + 1) * rows]
        return matrix

    def view(self) -> Tensor:
        return self.select(self.param.data)

    def grad(self) -> Tensor | None:
        return None if self.param.grad is None else self.select(self.param.grad)


def bind_weights(
    model: nn.Module,
    layout: Layout,
    names: Iterable[str],
    source: object | None = None,
) -> dict[str, WeightRef]:
    """Layout module name -> WeightRef for every name (see the module docstring).

    Raises UnsupportedArchitectureError when a module has no runtime counterpart, when a view's shape
    disagrees with the layout, or when a checked view differs from the checkpoint (`source`: an
    `quantgate.exporter.source.Source`).
    """
    modules = [layout.modules[n] for n in names]
    experts_modules = find_experts_modules(model)
    binding = bind_targets(model, [target_from_module(m) for m in modules], experts_modules)
    if binding.unbound:
        raise UnsupportedArchitectureError(
            f"auto: {len(binding.unbound)} module(s) have no counterpart in the {type(model).__name__} "
            f"runtime model, so they cannot be scored: {binding.unbound[:5]}"
        )
    refs: dict[str, WeightRef] = {}
    for runtime, targets in binding.linears.items():
        linear = model.get_submodule(runtime)
        for name in targets:
            refs[name] = _ref(layout.modules[name], linear.weight, None, False, None, False)
    for runtime, by_input in binding.experts.items():
        experts = model.get_submodule(runtime)
        gated = bool(getattr(experts, "has_gate", True))
        table = EXPERT_PARAM if gated else UNGATED_EXPERT_PARAM
        for (expert, which), targets in by_input.items():
            param = getattr(experts, table[which])
            for name in targets:
                module = layout.modules[name]
                refs[name] = _expert_ref(
                    module, param, expert, _is_transposed(experts), gated and which == "gate_up"
                )
    for module in modules:
        _check_shape(refs[module.name], module)
    if source is not None:
        _check_values(refs, layout, source)
    return refs


def _is_transposed(experts: nn.Module) -> bool:
    """Per-expert matrices stored [in, out]: the module's own flag, else the dense-experts table."""
    if hasattr(experts, "is_transposed"):
        return bool(experts.is_transposed)
    return DENSE_EXPERTS[type(experts).__name__].is_transposed


def _ref(
    module: Module,
    param: nn.Parameter,
    expert: int | None,
    transposed: bool,
    half: int | None,
    interleaved: bool,
) -> WeightRef:
    return WeightRef(
        module.name,
        module.kind,
        module.fused_group or module.name,
        param,
        expert,
        transposed,
        half,
        interleaved,
    )


def _expert_ref(
    module: Module, param: nn.Parameter, expert: int, transposed: bool, gated_in: bool
) -> WeightRef:
    half = HALF_BY_ROLE.get(module.role or "") if gated_in else None
    interleaved = bool(module.fused is not None and module.fused.interleaved)
    if module.fused is not None and module.fused.rows is not None and gated_in:
        start, stop = module.fused.rows
        half = start // (stop - start)
    return _ref(module, param, expert, transposed, half, interleaved)


def _check_shape(ref: WeightRef, module: Module) -> None:
    shape = tuple(ref.view().shape)
    if shape != (module.out_features, module.in_features):
        raise UnsupportedArchitectureError(
            f"auto: runtime weight of {module.name} has shape {list(shape)}, the checkpoint says "
            f"[{module.out_features}, {module.in_features}]; this model's runtime layout is not supported"
        )


def _check_values(refs: dict[str, WeightRef], layout: Layout, source: object) -> None:
    """One module per (runtime parameter, role, half) must equal the checkpoint (cast to the model dtype)."""
    seen: set[tuple[int, str | None, int | None]] = set()
    for name, ref in sorted(refs.items()):
        if ref.expert is None:
            continue  # a Linear, by name or transformers' own rename: the shape check suffices
        key = (id(ref.param), layout.modules[name].role, ref.half)
        if key in seen:
            continue
        seen.add(key)
        on_disk = source.module_weight(layout.modules[name])  # type: ignore[attr-defined]
        view = ref.view()
        if not torch.equal(on_disk.to(device=view.device, dtype=view.dtype), view):
            raise UnsupportedArchitectureError(
                f"auto: the runtime weight bound to {name} differs from the checkpoint's (gate/up order or "
                "transposition of the fused experts is not what the layout says); cannot score this model"
            )
    log.debug("auto: verified %d fused-expert bindings against the checkpoint", len(seen))
