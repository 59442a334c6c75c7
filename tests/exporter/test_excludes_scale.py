"""Exclude-pattern synthesis at DeepSeek-V3 scale, and the exactness of its fast checker.

`quantgate.exporter.excludes._Checker` answers "which quantized modules does this pattern exclude in engine E"
from equivalence classes and a literal prefilter instead of asking the engine about every module.
These tests prove, against the engines' own matchers (`quantgate.validators.engines`), that the answers are
identical on name sets of every naming family we support, and that a ~45k-module model is fast.
"""

from __future__ import annotations

import random
import time

import pytest

from quantgate.exporter.excludes import _Checker, candidates, synthesize_excludes
from quantgate.validators.engines import ENGINE_SEMANTICS

EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
MLA_PROJ = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def deepseek_v3_names(layers: int = 61, experts: int = 256, dense: int = 3) -> tuple[list[str], list[str]]:
    """(quantized, excluded) module names of a DeepSeek-V3-shaped model quantized with `nvfp4`."""
    quantized, excluded = [], ["model.embed_tokens", "lm_head"]
    for i in range(layers):
        base = f"model.layers.{i}"
        quantized += [f"{base}.self_attn.{p}" for p in MLA_PROJ]
        if i < dense:
            quantized += [f"{base}.mlp.{p}" for p in EXPERT_PROJ]
            continue
        quantized += [f"{base}.mlp.experts.{e}.{p}" for e in range(experts) for p in EXPERT_PROJ]
        quantized += [f"{base}.mlp.shared_experts.{p}" for p in EXPERT_PROJ]
        excluded.append(f"{base}.mlp.gate")
    return quantized, excluded


def _family_names() -> dict[str | None, tuple[list[str], list[str]]]:
    """Small (quantized, excluded) name sets in each naming family the engines treat differently."""
    q, ex = deepseek_v3_names(layers=12, experts=4, dense=2)
    q = [n for n in q if not n.startswith("model.layers.11.")]   # layer 11 stands in for an MTP layer
    ex += [f"model.layers.11.mlp.experts.{e}.{p}" for e in range(4) for p in EXPERT_PROJ]
    ex += [f"model.layers.11.self_attn.{p}" for p in MLA_PROJ]
    families: dict[str | None, tuple[list[str], list[str]]] = {"DeepseekV3ForCausalLM": (q, ex)}
    gq, gex = [], ["model.embed_tokens"]
    for i in range(12):
        base = f"model.language_model.layers.{i}"
        gq += [f"{base}.self_attn.{p}_proj" for p in "qkvo"] + [f"{base}.mlp.{p}" for p in EXPERT_PROJ]
        experts = [f"{base}.experts.{e}.{p}" for e in range(4) for p in EXPERT_PROJ]
        (gex if i == 1 else gq).extend(experts)
        gex.append(f"{base}.router.proj")
    gex += ["model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.embed_vision.embedding_projection"]
    families["Gemma4ForConditionalGeneration"] = (gq, gex)
    families["Gemma4ForCausalLM"] = ([n.replace("model.language_model.", "model.") for n in gq],
                                     [n.replace("model.language_model.", "model.") for n in gex
                                      if "vision" not in n])
    mq, mex = [], ["model.embed_tokens", "lm_head"]
    for i in range(12):
        base = f"model.layers.{i}"
        mq += [f"{base}.self_attn.{p}_proj" for p in "qkvo"]
        mq += [f"{base}.block_sparse_moe.experts.{e}.w{k}" for e in range(4) for k in (1, 2, 3)]
        mex.append(f"{base}.block_sparse_moe.gate")
    families[None] = (mq, mex)
    return families


@pytest.mark.parametrize("arch", list(_family_names()))
def test_fast_checker_is_exact(arch: str | None) -> None:
    """Every candidate pattern of every module (plus fold-style wildcards): same hits as brute force."""
    quantized, excluded = _family_names()[arch]
    checker = _Checker(quantized, arch, ENGINE_SEMANTICS)
    rng = random.Random(0)
    sample = rng.sample(quantized, 6) + rng.sample(excluded, min(6, len(excluded)))
    patterns = sorted({p for m in sample for p in candidates(m)} | {"*", "model.layers.*.mlp.gate", "lm_head*",
                                                                     "*experts*", "model.layers.1?.mlp*"})
    assert len(patterns) > 150
    for engine, sem in ENGINE_SEMANTICS.items():
        for pattern in patterns:
            brute = [q for q in quantized if sem.is_excluded(q, [pattern], arch)]
            assert checker.hits(engine, [pattern]) == brute, (engine, pattern)
            assert checker.safe(pattern) == (not any(
                sem_.is_excluded(q, [pattern], arch) for sem_ in ENGINE_SEMANTICS.values() for q in quantized))


def test_synthesis_is_fast_and_exact_at_deepseek_v3_scale() -> None:
    """~45k quantized modules (61 layers x 256 experts), routers, an excluded MTP-like layer and a
    user-excluded MoE layer: seconds, not minutes; exact in both engines."""
    arch = "DeepseekV3ForCausalLM"
    quantized, excluded = deepseek_v3_names()
    user = {f"model.layers.20.mlp.experts.{e}.{p}" for e in range(256) for p in EXPERT_PROJ}
    quantized = [q for q in quantized if q not in user]
    excluded += sorted(user) + [f"model.layers.61.mlp.experts.{e}.{p}" for e in range(256) for p in EXPERT_PROJ]
    excluded += [f"model.layers.61.self_attn.{p}" for p in MLA_PROJ] + ["model.layers.61.eh_proj"]
    fused = [q for q in quantized if q.rpartition(".")[2] in ("gate_proj", "up_proj", "q_a_proj",
                                                              "kv_a_proj_with_mqa")]
    assert len(quantized) > 44_000
    start = time.perf_counter()
    result = synthesize_excludes(excluded, quantized, arch, fused_members=fused)
    seconds = time.perf_counter() - start
    assert not result.uncovered and not result.overreach, result
    assert result.patterns == ["lm_head", "model.embed_tokens", "model.layers.*.mlp.gate",
                               "model.layers.20.mlp.experts*", "model.layers.61*"]
    assert seconds < 30, seconds   # ~1 s on a loaded 2-core box; the per-module check took minutes
    # independent proof with the engines themselves, on every excluded module and two whole layers
    probe = [q for q in quantized if q.startswith(("model.layers.2.", "model.layers.21."))]
    for sem in ENGINE_SEMANTICS.values():
        assert all(sem.is_excluded(m, result.patterns, arch) for m in excluded)
        assert not any(sem.is_excluded(q, result.patterns, arch) for q in probe)
