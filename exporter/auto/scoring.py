"""Sensitivity of every decision group to every candidate scheme, measured on the real model.

The model is the transformers model of the checkpoint (the class its `architectures` names, so a
multimodal wrapper such as Gemma4ForConditionalGeneration is scored whole: the language model's
hidden states go through the full model's own `lm_head`). Inputs are token ids only; `labels` are
never passed to any forward (a base model would reject them, a wrapper would route them oddly):
the loss is computed here from the logits. Weights are perturbed with our own fake quantization
(`perturb.py`), so scoring runs on CPU as on GPU. BF16 scores 0 by definition.

Methods (`METHODS`):

* `kl_div` — for each group and scheme: fake-quantize that group alone (everything else BF16), run
  the scoring tokens, and take the mean per-token KL(P_bf16 || P_quant) of the next-token
  distributions; the original bytes are restored after each measurement. Exact for that
  perturbation, costs (groups × schemes) forward passes. Reference log-probs are kept for at most
  `REF_LOGPROB_BYTES` of tokens at a time; larger scoring sets are processed in chunks.
* `gradient` — one forward + backward per batch of the next-token loss, accumulating the diagonal
  empirical Fisher F = mean over batches of g ⊙ g (g = ∂loss/∂W of the batch), then for every group
  and scheme, with ΔW = fakequant(W) − W, score = ½ Σ F ⊙ ΔW² (no further forward pass). This is
  the second-order Taylor term of the loss increase with the Hessian replaced by its Fisher
  approximation. The first-order term g·ΔW is not used: at a trained model the mean gradient is
  near zero and the term is sign-indefinite (a negative "cost" would make the optimiser prefer
  damage), and |g·ΔW| is dominated by noise. ModelOpt's `gradient` method is the same Fisher idea
  taken at the module outputs (Σ (∂L/∂Y · ΔY)²); ours is its weight-space diagonal, which needs no
  per-module hooks and works unchanged for fused 3-D experts (their gradients are sliced per expert
  like the weights). Each batch's squared gradient is scaled by its token count so
  the score estimates the per-token loss increase in nats, comparable with `kl_div`'s numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantgate.exporter.auto.groups import BF16, DecisionGroup
from quantgate.exporter.auto.perturb import assignment, quantized, weight_errors
from quantgate.exporter.auto.runtime import WeightRef, bind_weights
from quantgate.exporter.calibration.model import forward_kwargs, input_device
from quantgate.exporter.progress import ProgressCallback, emit
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Layout

log = logging.getLogger(__name__)

#: Reference log-probs held at once by `kl_div` (fp32 tokens × vocab); beyond it, chunks of batches.
REF_LOGPROB_BYTES = 1 << 30
#: Progress events go out under the pipeline's planning stage (scoring is part of making the plan).
STAGE = "plan"

Scores = dict[str, dict[str, float]]


def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits [b, L, V] of the full model for token ids [b, L] (no labels, no cache)."""
    out = model(input_ids=ids.to(input_device(model)), **forward_kwargs(model, all_logits=True))
    return out.logits


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross entropy of predicting ids[:, 1:] from logits[:, :-1] (fp32)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].to(logits.device).reshape(-1)
    )


def kl_sum(ref_logprobs: Tensor, logits: Tensor) -> float:
    """Σ over tokens of KL(P_ref || P) from reference log-probs and new logits (both [b, L, V])."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return float(F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="sum"))


def _chunks(batches: Sequence[Tensor], vocab: int) -> list[list[Tensor]]:
    """Consecutive batches whose fp32 log-probs fit REF_LOGPROB_BYTES (at least one batch each)."""
    out: list[list[Tensor]] = [[]]
    held = 0
    for batch in batches:
        size = batch.numel() * vocab * 4
        if out[-1] and held + size > REF_LOGPROB_BYTES:
            out.append([])
            held = 0
        out[-1].append(batch)
        held += size
    return out


def _scored(group: DecisionGroup) -> list[str]:
    return [s for s in group.allowed if s != BF16]


@torch.inference_mode()
def kl_div_scores(
    model: nn.Module,
    refs: Mapping[str, WeightRef],
    groups: Sequence[DecisionGroup],
    batches: Sequence[Tensor],
    *,
    progress: ProgressCallback | None = None,
) -> Scores:
    """Mean per-token KL(BF16 || group fake-quantized) per group and scheme (see the module docstring)."""
    vocab = int(logits_of(model, batches[0][:1, :2]).shape[-1])
    tokens = sum(b.numel() for b in batches)
    totals: Scores = {g.key: {s: 0.0 for s in _scored(g)} for g in groups}
    work = len(_chunks(batches, vocab)) * sum(len(_scored(g)) for g in groups)
    done = 0
    for chunk in _chunks(batches, vocab):
        reference = [F.log_softmax(logits_of(model, b).float(), dim=-1) for b in chunk]
        for group in groups:
            members = [refs[m] for m in group.modules]
            for scheme_name in _scored(group):
                with quantized(members, scheme_name):
                    totals[group.key][scheme_name] += sum(
                        kl_sum(r, logits_of(model, b)) for r, b in zip(reference, chunk)
                    )
                done += 1
                emit(
                    progress,
                    STAGE,
                    done / work,
                    f"scoring (kl_div): {group.key} {scheme_name}",
                    phase="score",
                    method="kl_div",
                    done=done,
                    total=work,
                )
        del reference
    return {key: {s: v / tokens for s, v in by_scheme.items()} for key, by_scheme in totals.items()}


def gradient_scores(
    model: nn.Module,
    refs: Mapping[str, WeightRef],
    groups: Sequence[DecisionGroup],
    batches: Sequence[Tensor],
    *,
    progress: ProgressCallback | None = None,
) -> Scores:
    """½ Σ F ⊙ ΔW² per group and scheme, F the diagonal empirical Fisher (see the module docstring)."""
    params = list({id(r.param): r.param for r in refs.values()}.values())
    fisher = _fisher(model, params, batches, progress)
    out: Scores = {}
    for group in groups:
        members = [refs[m] for m in group.modules]
        out[group.key] = {}
        for scheme_name in _scored(group):
            total = sum(
                float((r.select(fisher[id(r.param)]) * e.square()).sum())
                for r, e in weight_errors(members, scheme_name)
            )
            out[group.key][scheme_name] = 0.5 * total
    return out


def _fisher(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Sequence[Tensor],
    progress: ProgressCallback | None,
) -> dict[int, Tensor]:
    """Per-token diagonal empirical Fisher (fp32) of `params`; only they require grad meanwhile.

    The gradient of a batch's mean loss over n predicted tokens is the mean of n per-token
    gradients, whose square is about 1/n of a per-token one (tokens treated as independent), so
    each batch adds n · g ⊙ g. With that scaling ½ Σ F ⊙ ΔW² estimates the per-token loss increase
    in nats, the same unit as `kl_div` (on the tiny test models the two agree within a small factor).
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    try:
        for step, batch in enumerate(batches, 1):
            with torch.enable_grad():
                next_token_loss(logits_of(model, batch), batch).backward()
            predicted = batch.shape[0] * (batch.shape[1] - 1)  # tokens the mean loss averages over
            for p in params:
                if p.grad is not None:
                    fisher[id(p)].add_(p.grad.float().square().mul_(predicted))
                    p.grad = None
            emit(
                progress,
                STAGE,
                step / len(batches),
                f"scoring (gradient): batch {step}/{len(batches)}",
                phase="score",
                method="gradient",
                done=step,
                total=len(batches),
            )
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
    for f in fisher.values():
        f.div_(len(batches))
    return fisher


#: --method name -> scorer(model, refs, groups, batches, progress=) -> group -> scheme -> score
METHODS: dict[str, Callable[..., Scores]] = {"kl_div": kl_div_scores, "gradient": gradient_scores}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(f"auto: unknown --method {method!r}; choose one of: {', '.join(METHODS)}")


def score_groups(
    model: nn.Module,
    layout: Layout,
    groups: Sequence[DecisionGroup],
    batches: Sequence[Tensor],
    *,
    method: str,
    source: Any | None = None,
    progress: ProgressCallback | None = None,
) -> Scores:
    """Bind the groups' weights in `model` and score them with `method` (kl_div | gradient)."""
    check_method(method)
    if not batches:
        raise UsageError("auto: scoring needs at least one sample (--score-samples >= 1)")
    was_training = model.training
    model.eval()
    refs = bind_weights(model, layout, [m for g in groups for m in g.modules], source)
    start = time.perf_counter()
    try:
        scores = METHODS[method](model, refs, groups, batches, progress=progress)
    finally:
        model.train(was_training)
    log.info(
        "auto: scored %d groups with %s on %d tokens in %.1f s",
        len(groups),
        method,
        sum(b.numel() for b in batches),
        time.perf_counter() - start,
    )
    return scores


@torch.inference_mode()
def plan_kl(
    model: nn.Module,
    refs: Mapping[str, WeightRef],
    groups: Sequence[DecisionGroup],
    choice: Mapping[str, str],
    batches: Sequence[Tensor],
) -> float:
    """Mean per-token KL(P_bf16 || P_plan) on `batches` with every group at its chosen scheme."""
    reference = [F.log_softmax(logits_of(model, b).float(), dim=-1) for b in batches]
    with assignment(refs, groups, choice):
        total = sum(kl_sum(r, logits_of(model, b)) for r, b in zip(reference, batches))
    return total / sum(b.numel() for b in batches)
