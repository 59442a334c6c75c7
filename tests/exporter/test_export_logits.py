"""Every export, loaded back through our dequantizer, stays within the error its scheme predicts.

How the bound is derived (no number is hard-coded):

1. The scheme's noise level. Quantize-dequantize a 1024x1024 N(0, 1) BF16 matrix with
   `quantgate.exporter.numerics` and measure eps = ||deq(W) - W||_F / ||W||_F, i.e. the scheme's SQNR
   (NVFP4 ~ 20.4 dB -> eps ~ 0.095; FP8 e4m3 per-tensor ~ 31 dB -> eps ~ 0.028).
2. What that noise does to this model. Quantization error of a max-scaled format behaves like
   additive noise uncorrelated with the inputs, with power eps^2 * mean(W^2). Add exactly that
   Gaussian noise to every weight the plan quantizes (and nothing else), load the model, and
   measure the relative logits error r_noise = ||L_noisy - L||_F / ||L - mean_vocab(L)||_F on fixed
   token ids, averaged over NOISE_SEEDS draws. (Tiny random models amplify weight noise a lot, and
   MoE routing flips are discontinuous, so this model-specific calibration is what makes a tight bound
   possible; a model-independent bound would have to be loose enough to hide real bugs.)
3. The bound: r_quant <= MARGIN * max(r_noise). In a MoE a weight perturbation that flips a
   token's top-k routing changes that token's logits by a lot, so the logits error is heavy-tailed:
   one draw can be twice another (measured: FP8 on Qwen3.5-MoE, noise draws 0.021-0.026, the
   quantized model 0.047, whose weight errors are all within 3 % of eps). MARGIN = 2 over the
   largest draw covers that; an export bug (a scale applied to the wrong module, gate/up swapped,
   experts out of order, a wrong global scale) multiplies the weight error of the affected modules
   far beyond eps and the logits error with it. A lower bound r_quant >= min(r_noise) / 4 checks
   that the weights really went through quantization.

The check itself (and NOISE_SEEDS, MARGIN) is `logit_bounds.assert_logits_within_noise_bound`,
shared with the compressed-tensors and auto-recipe export tests.
"""

from __future__ import annotations

import pytest
import torch
from logit_bounds import assert_logits_within_noise_bound, weight_tensor

from quantgate.exporter.recipes import make_plan
from quantgate.exporter.source import open_source

ARCHS = ("gemma4", "gemma4_mm", "qwen3_moe", "qwen3_5_moe", "mixtral", "deepseek_v3", "llama")
RECIPES = ("nvfp4", "nvfp4_mlp_only", "nvfp4_experts_only", "fp8")
CASES = [(a, r) for a in ARCHS for r in RECIPES if not (a == "llama" and r == "nvfp4_experts_only")]


@pytest.fixture(scope="module")
def scheme_eps() -> dict[str, float]:
    from quantgate.exporter.numerics.fp8 import dequantize_fp8, quantize_fp8
    from quantgate.exporter.numerics.nvfp4 import dequantize_nvfp4, quantize_nvfp4

    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = w.float()
    deq = {"NVFP4": dequantize_nvfp4(*quantize_nvfp4(w), dtype=torch.float32),
           "FP8": dequantize_fp8(*quantize_fp8(w), dtype=torch.float32)}
    return {name: float((d - ref).norm() / ref.norm()) for name, d in deq.items()}


def test_scheme_noise_levels_match_their_sqnr(scheme_eps: dict[str, float]) -> None:
    """Sanity of step 1: NVFP4 ~ 20 dB and FP8 ~ 31 dB on Gaussian weights (bounds are generous)."""
    assert 0.07 < scheme_eps["NVFP4"] < 0.12
    assert 0.015 < scheme_eps["FP8"] < 0.04


@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_dequantized_logits_within_scheme_bound(exported, scheme_eps, arch: str, recipe: str) -> None:
    source_dir, result = exported(arch, recipe)
    assert result.ok
    source = open_source(str(source_dir))
    eps = scheme_eps["FP8" if recipe == "fp8" else "NVFP4"]
    noisy = {weight_tensor(source, n): eps for n in make_plan(source.layout, recipe).quantized()}
    assert_logits_within_noise_bound(source, source_dir, result.output, noisy)
