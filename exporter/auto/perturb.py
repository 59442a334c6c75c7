"""Put a decision group (or a whole plan) into its fake-quantized state in the runtime model, and back.

`quantized(refs, algo)` fake-quantizes the group's weights in place for the duration of a `with`
block and restores the exact original bytes afterwards (also on error); `assignment(...)` does the
same for every group of a plan at once (what the plan's export will compute, weight-wise);
`weight_errors(...)` gives ΔW = fakequant(W) − W per module without touching the model. Fused
groups inside a decision group (one expert's gate/up, q/k/v) share their per-tensor scale as the
export's writer does (`fakequant.fake_quant_fused`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor

from quantgate.exporter.auto.fakequant import fake_quant_fused
from quantgate.exporter.auto.groups import BF16, DecisionGroup
from quantgate.exporter.auto.runtime import WeightRef
from quantgate.exporter.recipes import DIALECT
from quantgate.validators.schemes import scheme


def quant_algo(scheme_name: str) -> str:
    """The ModelOpt quant_algo of a candidate name (the key of the fake-quant table)."""
    algo = scheme(DIALECT, scheme_name).quant_algo
    assert algo is not None
    return algo


def by_fused_key(refs: Sequence[WeightRef]) -> list[list[WeightRef]]:
    """Split a decision group's refs into the fused groups that share per-tensor scales."""
    out: dict[str, list[WeightRef]] = {}
    for ref in refs:
        out.setdefault(ref.fused_key, []).append(ref)
    return list(out.values())


def fake_quantized(refs: Sequence[WeightRef], scheme_name: str) -> Iterator[tuple[WeightRef, Tensor]]:
    """(ref, its fake-quantized weight) for every ref, one fused group at a time (bounded memory),
    each computed from the weights as they are when that fused group is reached."""
    algo = quant_algo(scheme_name)
    for fused in by_fused_key(refs):
        with torch.no_grad():
            weights = fake_quant_fused([r.view() for r in fused], algo, fused[0].kind)
        yield from zip(fused, weights)


def weight_errors(refs: Sequence[WeightRef], scheme_name: str) -> Iterator[tuple[WeightRef, Tensor]]:
    """(ref, ΔW = fakequant(W) − W in fp32) for every ref; the model is not modified."""
    for ref, q in fake_quantized(refs, scheme_name):
        yield ref, q.float() - ref.view().float()


@contextmanager
def quantized(refs: Sequence[WeightRef], scheme_name: str) -> Iterator[None]:
    """Within the block, `refs` hold their fake-quantized weights; BF16 is a no-op."""
    if scheme_name == BF16:
        yield
        return
    with torch.no_grad():
        originals = [r.view().clone() for r in refs]
        for ref, w in fake_quantized(refs, scheme_name):
            ref.view().copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for ref, w in zip(refs, originals):
                ref.view().copy_(w)


@contextmanager
def assignment(
    refs: Mapping[str, WeightRef], groups: Sequence[DecisionGroup], choice: Mapping[str, str]
) -> Iterator[None]:
    """Within the block, every group holds the fake-quantized weights of its chosen scheme."""
    with ExitStack() as stack:
        for group in groups:
            stack.enter_context(quantized([refs[m] for m in group.modules], choice[group.key]))
        yield
