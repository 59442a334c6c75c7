"""auto beats chance: at 6.0 bits its plan is closer to the BF16 model than random plans of at least
as many bits, measured as KL divergence on held-out tokens (issue 6, "Quality").

The tiny models are initialised with a larger `initializer_range` so their next-token distributions
are peaked (entropy well below log(vocab)) and a KL divergence means something. Scoring tokens
(seed 0) and held-out tokens (seed 99) are disjoint draws of the same random-token source.
Random plans: every assignment of schemes to decision groups whose effective bits lie in
[auto's achieved bits, 6.0] is enumerated, and several are drawn with fixed seeds.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from quantgate.exporter.auto import effective_bits, plan_auto
from quantgate.exporter.auto.runtime import bind_weights
from quantgate.exporter.auto.scoring import plan_kl
from quantgate.exporter.calibration.data import calibration_batches
from quantgate.exporter.calibration.model import load_calibration_model, load_tokenizer
from quantgate.exporter.source import open_source

log = logging.getLogger(__name__)

BUDGET = 6.0
RANDOM_SEEDS = range(6)
#: Peaked tiny models (default initializer_range 0.02 gives near-uniform logits).
QUALITY_MODELS: dict[str, dict] = {"gemma4": {"initializer_range": 0.1}, "llama": {"initializer_range": 0.1}}
SCORING = {"score_samples": 8, "score_seq_len": 32, "device": "cpu", "seed": 0}


def _held_out(path: Path, model: object) -> list:
    return calibration_batches(
        "random",
        tokenizer=load_tokenizer(str(path), None, None),
        config=model.config,
        vocab_size=model.get_input_embeddings().num_embeddings,
        samples=8,
        seq_len=32,
        batch_size=4,
        seed=99,
    ).batches


def _random_plans(groups: list, low: float, high: float) -> list[dict[str, str]]:
    keys = [g.key for g in groups]
    plans = []
    for combo in itertools.product(*(g.allowed for g in groups)):
        choice = dict(zip(keys, combo))
        if low - 1e-12 <= effective_bits(groups, choice) <= high + 1e-12:
            plans.append(choice)
    return plans


@pytest.mark.parametrize("method", ["kl_div", "gradient"])
@pytest.mark.parametrize("arch", list(QUALITY_MODELS))
def test_auto_beats_random_plans_of_equal_bits(
    tiny_model: Callable[..., Path], arch: str, method: str, record_property: Callable
) -> None:
    path = tiny_model(arch, **QUALITY_MODELS[arch])
    source = open_source(str(path))
    model = load_calibration_model(str(path), device="cpu")
    batch_size = 4 if method == "kl_div" else 1
    auto = plan_auto(
        source, BUDGET, ("nvfp4", "fp8"), method=method, score_batch_size=batch_size, model=model, **SCORING
    )
    assert auto.effective_bits <= BUDGET
    held_out = _held_out(path, model)
    refs = bind_weights(model, source.layout, list(auto.schemes), source)
    auto_kl = plan_kl(model, refs, auto.groups, auto.choice, held_out)

    candidates = _random_plans(auto.groups, auto.effective_bits, BUDGET)
    assert len(candidates) >= len(RANDOM_SEEDS)
    draws = [random.Random(seed).choice(candidates) for seed in RANDOM_SEEDS]
    random_kls = [plan_kl(model, refs, auto.groups, choice, held_out) for choice in draws]
    random_bits = [effective_bits(auto.groups, choice) for choice in draws]
    mean_random = sum(random_kls) / len(random_kls)
    log.info(
        "%s/%s: auto KL %.5g at %.4f bits; random KL mean %.5g (min %.5g, max %.5g) at %.4f-%.4f bits, "
        "%d candidate plans",
        arch,
        method,
        auto_kl,
        auto.effective_bits,
        mean_random,
        min(random_kls),
        max(random_kls),
        min(random_bits),
        max(random_bits),
        len(candidates),
    )
    record_property("auto_kl", auto_kl)
    record_property("auto_bits", auto.effective_bits)
    record_property("random_kl_mean", mean_random)
    assert all(b >= auto.effective_bits - 1e-12 for b in random_bits)
    assert auto_kl < mean_random
    assert auto_kl <= sorted(random_kls)[len(random_kls) // 2]  # and at or below the median draw
