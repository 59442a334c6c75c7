"""Per-expert input statistics for fused 3-D experts.

Two ways a transformers v5 experts module is reached:

* dispatched (`@use_experts_implementation`: Qwen3-MoE, Mixtral, DeepSeek-V3, Gemma4, GPT-OSS ...):
  we register `quantgate_calib` with transformers' `ExpertsInterface`. It records statistics from
  `(hidden_states [T,H], top_k_index [T,K])`, then returns the output of the implementation the
  model had before (grouped_mm by default), so the model's outputs use the real routing, unchanged.
* dense, not dispatched (`DENSE_EXPERTS`, Llama4): the model calls `experts(x * score)` over all
  experts at once (`[E*T, H]`, score 0 for unrouted tokens). A forward pre-hook reads that tensor;
  a hook on the router supplies the logits for the all-experts statistics.

Statistics per expert: the gate_up input amax and the down input amax (h = act(gate) * up). With
all_experts, every token also goes through every expert, for statistics only: the gate_up input of
every expert is then the layer's input, and h is computed for all experts in chunks (bounded memory;
the down projection itself is never needed). For dense experts the hypothetical input of a token
in expert e is x * score_e(router logits), exactly what the experts would see if it were routed.
Geometry comes from the module's own flags (has_gate, has_bias, is_transposed) and `_apply_gate`
(GPT-OSS: interleaved, clamped swiglu), never from the model family.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CALIB_IMPLEMENTATION = "quantgate_calib"
RECORDER_ATTR = "_quantgate_experts_recorder"
DEFAULT_CHUNK_BYTES = 256 * 2**20  # working-set bound of one all-experts projection chunk


@dataclass(frozen=True)
class DenseExpertsSpec:
    """An experts class the model calls without routing info, its input pre-scaled by router scores."""

    router_attr: str  # sibling module (on the experts' parent) producing the router logits
    logits_index: int  # position of the full logits [T, E] in the router's output tuple
    score: Callable[[Tensor], Tensor]  # logits -> the per-expert factor the experts' input is multiplied by
    is_transposed: bool  # weights stored [E, in, out] (what the dispatched flag would say)


DENSE_EXPERTS: dict[str, DenseExpertsSpec] = {
    "Llama4TextExperts": DenseExpertsSpec(
        router_attr="router", logits_index=1, score=torch.sigmoid, is_transposed=True
    ),
}


def is_dispatched_experts(module: nn.Module) -> bool:
    """A module decorated with transformers' `use_experts_implementation` (carries its flags)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "down_proj")


def find_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Runtime name -> every fused experts module calibration can observe per expert."""
    return {
        name: module
        for name, module in model.named_modules()
        if is_dispatched_experts(module) or type(module).__name__ in DENSE_EXPERTS
    }


def _is_transposed(module: nn.Module) -> bool:
    if hasattr(module, "is_transposed"):
        return bool(module.is_transposed)
    return DENSE_EXPERTS[type(module).__name__].is_transposed


def _in_width(module: nn.Module) -> int:
    """Output width of the first projection (2I when gated)."""
    weight, _ = _in_weight(module)
    return weight.shape[-1] if _is_transposed(module) else weight.shape[-2]


def _in_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The first projection of every expert ([E, out, in], or [E, in, out] when transposed) and its bias."""
    gated = getattr(module, "has_gate", True)
    weight = module.gate_up_proj if gated else module.up_proj
    bias = None
    if getattr(module, "has_bias", False):
        bias = module.gate_up_proj_bias if gated else module.up_proj_bias
    return weight, bias


def _gate(module: nn.Module, out: Tensor) -> Tensor:
    """act(gate) * up over the last dim (the module's own `_apply_gate` when it has one)."""
    if not getattr(module, "has_gate", True):
        return module.act_fn(out)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(out)
    gate, up = out.chunk(2, dim=-1)  # concatenated [gate; up] (Llama4)
    return module.act_fn(gate) * up


def down_inputs(module: nn.Module, x: Tensor, experts: slice) -> Tensor:
    """h = act(gate) * up of one range of experts, each with its own input: x [Ec,T,H] -> [Ec,T,I]."""
    weight, bias = _in_weight(module)
    w = weight[experts]  # [Ec, out, in] or [Ec, in, out]
    w = w if _is_transposed(module) else w.transpose(-1, -2)  # -> [Ec, in, out]
    out = torch.bmm(x.to(w.dtype), w)  # [Ec, T, out]
    if bias is not None:
        out = out + bias[experts].unsqueeze(1)
    return _gate(module, out)


def shared_down_inputs(module: nn.Module, x: Tensor, experts: slice) -> Tensor:
    """h of a range of experts that all see the same x [T,H] -> [T,Ec,I], as ONE GEMM [T,H] x [H,Ec*out]."""
    weight, bias = _in_weight(module)
    w = weight[experts]
    n, width = w.shape[0], (w.shape[-1] if _is_transposed(module) else w.shape[-2])
    if _is_transposed(module):  # [Ec, in, out] -> [Ec*out, in]
        w = w.transpose(-1, -2)
    out = F.linear(x.to(w.dtype), w.reshape(n * width, -1))  # [T, Ec*out]
    if bias is not None:
        out = out + bias[experts].reshape(-1)
    return _gate(module, out.view(x.shape[0], n, width))


class ExpertsRecorder:
    """Running per-expert amax of one experts module (tensors stay on the module's device)."""

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        all_experts: bool,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        output_implementation: str | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.all_experts = all_experts
        self.chunk_bytes = chunk_bytes
        self.output_implementation = output_implementation
        self.num_experts = int(module.num_experts)
        device = module.down_proj.device
        self.gate_up_amax = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        self.down_amax = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
        self.observed = torch.zeros(self.num_experts, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(self.num_experts, dtype=torch.int64, device=device)
        self.pending_router: tuple[Tensor, Tensor] | None = None  # dense experts: (x [T,H], logits [T,E])
        self._warned = False

    # ------------------------------------------------------------------ accumulation
    def _update(self, experts: slice, gate_up: Tensor, down: Tensor) -> None:
        self.gate_up_amax[experts] = torch.maximum(self.gate_up_amax[experts], gate_up.float())
        self.down_amax[experts] = torch.maximum(self.down_amax[experts], down.float())
        self.observed[experts] = True

    def _chunks(self, tokens: int, width: int, itemsize: int) -> tuple[int, int]:
        """(experts per chunk, tokens per chunk) so that one [Ec, Tc, width] block fits chunk_bytes."""
        per_token = max(1, width * itemsize * 4)  # projection + gate + temporaries
        token_chunk = max(1, min(tokens, self.chunk_bytes // per_token))
        expert_chunk = max(1, min(self.num_experts, self.chunk_bytes // (per_token * token_chunk)))
        return expert_chunk, token_chunk

    def observe_routed(self, x: Tensor, top_k_index: Tensor) -> None:
        """Dispatched experts: real routing statistics, plus all experts when requested."""
        x = x.detach()
        ids = top_k_index.reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.num_experts)]  # drop expert-parallel sentinels
        counts = torch.bincount(ids, minlength=self.num_experts)[: self.num_experts]
        self.tokens += counts
        if self.all_experts:
            self._observe_shared_input(x)
            return
        for e in torch.nonzero(counts).flatten().tolist():
            rows = (top_k_index == e).any(dim=-1)
            self._observe_rows(x[rows], e)

    def _observe_rows(self, rows: Tensor, expert: int) -> None:
        """Statistics of one expert from the inputs it actually received ([n, H])."""
        sl = slice(expert, expert + 1)
        h = down_inputs(self.module, rows.unsqueeze(0), sl)  # [1, n, I]
        self._update(sl, rows.abs().amax().reshape(1), h.abs().amax(dim=(1, 2)))

    def _observe_shared_input(self, x: Tensor) -> None:
        """Every token through every expert (statistics only): x [T,H] is each expert's gate_up input."""
        x_amax = x.abs().amax().float()
        e_chunk, t_chunk = self._chunks(x.shape[0], _in_width(self.module), x.element_size())
        for e0 in range(0, self.num_experts, e_chunk):
            sl = slice(e0, min(e0 + e_chunk, self.num_experts))
            down = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=x.device)
            for t0 in range(0, x.shape[0], t_chunk):
                h = shared_down_inputs(self.module, x[t0 : t0 + t_chunk], sl)  # [Tc, Ec, I]
                down = torch.maximum(down, h.abs().amax(dim=(0, 2)).float())
            self._update(sl, x_amax.expand(sl.stop - sl.start), down)

    def observe_dense(self, routed_in: Tensor) -> None:
        """Dense experts: routed_in [E*T, H] = x * router score (0 for tokens not routed to e)."""
        blocks = routed_in.detach().view(self.num_experts, -1, routed_in.shape[-1])  # [E, T, H]
        routed = blocks.abs().amax(dim=-1) > 0  # [E, T]
        self.tokens += routed.sum(dim=-1)
        pending, self.pending_router = self.pending_router, None
        if self.all_experts and pending is not None:
            self._observe_scaled(*pending)
            return
        if self.all_experts and not self._warned:
            self._warned = True
            logger.warning(
                "%s: router logits not seen; all-experts statistics fall back to routed tokens", self.name
            )
        for e in torch.nonzero(routed.any(dim=-1)).flatten().tolist():
            self._observe_rows(blocks[e][routed[e]], e)

    def _observe_scaled(self, x: Tensor, logits: Tensor) -> None:
        """Dense experts, all experts: token t's input to expert e is x_t * score(logits_te)."""
        spec = DENSE_EXPERTS[type(self.module).__name__]
        scores = spec.score(logits.float()).to(x.dtype)  # [T, E]
        e_chunk, t_chunk = self._chunks(
            x.shape[0], max(_in_width(self.module), x.shape[-1]), x.element_size()
        )
        for e0 in range(0, self.num_experts, e_chunk):
            sl = slice(e0, min(e0 + e_chunk, self.num_experts))
            gate_up = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=x.device)
            down = torch.zeros_like(gate_up)
            for t0 in range(0, x.shape[0], t_chunk):
                factor = scores[t0 : t0 + t_chunk, sl].T.unsqueeze(-1)  # [Ec, Tc, 1]
                xs = x[t0 : t0 + t_chunk].unsqueeze(0) * factor  # [Ec, Tc, H]
                gate_up = torch.maximum(gate_up, xs.abs().amax(dim=(1, 2)).float())
                down = torch.maximum(down, down_inputs(self.module, xs, sl).abs().amax(dim=(1, 2)).float())
            self._update(sl, gate_up, down)

    # ------------------------------------------------------------------ results
    def finalize(self) -> tuple[list[float], list[float], list[int], list[int]]:
        """(gate_up amax, down amax, routed tokens, experts given the layer maximum) as Python lists."""
        observed = self.observed.cpu()
        gate_up, down = self.gate_up_amax.cpu(), self.down_amax.cpu()
        missing = [e for e in range(self.num_experts) if not observed[e]]
        if missing and observed.any():
            gate_up[~observed] = gate_up[observed].max()
            down[~observed] = down[observed].max()
        return gate_up.tolist(), down.tolist(), self.tokens.cpu().tolist(), missing


def calibration_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args, **kwargs
) -> Tensor:
    """The `quantgate_calib` experts implementation: record, then run the model's own implementation."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    recorder: ExpertsRecorder | None = getattr(self, RECORDER_ATTR, None)
    implementation = "grouped_mm"
    if recorder is not None:
        recorder.observe_routed(hidden_states, top_k_index)
        implementation = recorder.output_implementation or implementation
    original = getattr(type(self).forward, "__wrapped__", None)
    forward = ALL_EXPERTS_FUNCTIONS.get_interface(implementation, original)
    return forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)


def register_calibration_implementation() -> None:
    """Register `quantgate_calib` with transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(CALIB_IMPLEMENTATION, calibration_experts_forward)
