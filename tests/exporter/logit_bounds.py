"""The logits bound every export test shares (derivation: test_export_logits.py's docstring).

An export's dequantized model must have a relative logits error of at most MARGIN times that of the
source model with Gaussian noise of power eps^2 * mean(W^2) added to exactly the weights the export
quantized (eps: the scheme's quantize-dequantize error), and at least a quarter of the smallest
noise draw's (so the weights really went through quantization).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from quantgate.exporter.testkit.dequant_load import load_dequantized_model, load_model, load_with_weights
from quantgate.exporter.source import Source

NOISE_SEEDS = (101, 102)
MARGIN = 2.0
BATCH, SEQ = 4, 32  # token ids the logits are compared on
IDS_SEED = 7


def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    """[BATCH, SEQ, vocab] float32 logits of `model` on fixed random token ids."""
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(IDS_SEED))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref||_F / ||ref - mean_vocab(ref)||_F."""
    return float((x - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())


def weight_tensor(source: Source, module_name: str) -> str:
    """The on-disk tensor holding a module's weight (the fused 3-D tensor for fused experts)."""
    module = source.layout.modules[module_name]
    return module.fused.tensor if module.fused is not None else module.tensors["weight"].name


def noisy_state(source: Source, eps: Mapping[str, float], seed: int) -> dict[str, torch.Tensor]:
    """The source tensors, each one named in `eps` (tensor name -> noise level) given Gaussian
    noise of power eps^2 * mean(W^2)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in source.view.tensors:
        t = source.tensor(name)
        if name in eps:
            f = t.float()
            t = (f + eps[name] * f.pow(2).mean().sqrt() * torch.randn(f.shape, generator=gen)).to(t.dtype)
        state[name] = t
    return state


def assert_logits_within_noise_bound(
    source: Source, source_dir: Path, export_dir: Path, eps: Mapping[str, float]
) -> None:
    """The export's logits error is within [min(noise) / 4, MARGIN * max(noise)] of the noise
    draws' (`eps`: tensor name -> noise level of every weight the export quantized)."""
    reference = load_model(source_dir)
    vocab = reference.get_input_embeddings().num_embeddings
    ref = logits(reference, vocab)
    quant = rel_error(logits(load_dequantized_model(export_dir, source_dir), vocab), ref)
    noise = [
        rel_error(logits(load_with_weights(source, noisy_state(source, eps, seed)), vocab), ref)
        for seed in NOISE_SEEDS
    ]
    assert min(noise) > 0
    assert quant <= MARGIN * max(noise), (quant, noise)
    assert quant >= min(noise) / 4, (quant, noise)
