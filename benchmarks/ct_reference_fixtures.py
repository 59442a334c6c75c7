"""Make the compressed-tensors reference fixtures: llm-compressor's MXFP4 and FP8_BLOCK presets.

    /work/labs/ct/bin/python -m benchmarks.ct_reference_fixtures \
        --out tests/exporter/fixtures/compressed_tensors

Runs the real producer, offline on CPU: llm-compressor 0.14.0 ``oneshot`` with
``QuantizationModifier(targets="Linear", scheme=S, ignore=["lm_head"])`` (data-free: both presets
have static weights and dynamic activations), then ``save_pretrained(save_compressed=True)``, which
runs compressed-tensors 0.20.0's ``MXFP4PackedCompressor`` / float-quantized compressor. The lab venv:

    python3.11 -m venv /work/labs/ct
    echo /work/main/.venv/lib/python3.11/site-packages > /work/labs/ct/lib/python3.11/site-packages/main.pth
    /work/labs/ct/bin/pip install --no-deps compressed-tensors==0.20.0 llmcompressor==0.14.0 \
        loguru psutil accelerate

(torch 2.13 and transformers come from the main venv through the .pth; never let pip pull torch).

Source models: one-layer ``LlamaForCausalLM`` in bf16 (hidden 160, intermediate 288: ragged
128-blocks in both dims), fp16 and fp32 (hidden 64, intermediate 96). Weights are N(0, 0.05^2)
with planted cases (`plant_cases`): an all-zero 32x32 corner (a zero MX block row and, in the bf16
model, the ragged corner 128-tile all zero), a block of 1e30 and one of 1e-30, bf16 subnormals,
block maxima at the significand edges of compressed-tensors' power-of-two rounding (1.75, just
below 1.75, 1.5, 7, 6, 4 times 2^k), -0.0 and tiny negatives, and E2M1 ties (0.25, 0.75, ... x scale).

Writes, per source dtype tag (``bf16`` / ``fp16`` / ``fp32``):
- ``source_<tag>.safetensors``: the source weights of the fixture modules (``FIXTURE_MODULES``);
- ``mxfp4_<tag>.safetensors`` / ``fp8_block_<tag>.safetensors``: every tensor the producer saved
  for those modules (``<module>.weight_packed`` / ``weight_scale``, or ``weight`` / ``weight_scale``);
and ``ct_config_groups.json``: the ``quantization_config`` that compressed-tensors wrote into
config.json for each scheme (bf16 model), plus the versions used.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("ct_reference_fixtures")

SCHEMES = {"mxfp4": "MXFP4", "fp8_block": "FP8_BLOCK"}
MODELS = {  # tag -> (dtype, hidden, intermediate, heads, head_dim)
    "bf16": (torch.bfloat16, 160, 288, 5, 32),
    "fp16": (torch.float16, 64, 96, 2, 32),
    "fp32": (torch.float32, 64, 96, 2, 32),
}
#: Modules whose tensors are kept (all of a 1-layer model would exceed the fixture budget).
FIXTURE_MODULES = {
    "bf16": ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"),
    "fp16": ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"),
    "fp32": ("model.layers.0.mlp.down_proj",),
}


def plant_cases(w: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 0.05^2) weights [out, in] (fp32) with the edge cases listed in the module docstring;
    the huge block is 3e4 for fp16 (1e30 would overflow to inf)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(w.shape, generator=g) * 0.05
    out_f, in_f = w.shape
    w[-32:, -32:] = 0.0                                    # zero MX blocks (and a zero ragged FP8 tile)
    unit = torch.rand(32, generator=g) * 2 - 1             # max |.| < 1
    w[0, :32] = unit * (3e4 if dtype == torch.float16 else 1e30)   # huge block (fp16 max is 65504)
    w[1, :32] = unit * 1e-30                               # tiny block (zeros in fp16)
    w[2, :32] = torch.linspace(-1, 1, 32) * 1e-39          # bf16/fp32 subnormals (fp16: zeros)
    edges = (1.75, 1.7421875, 1.5, 7.0, 6.0, 4.0, 1.0, 0.875)
    for j, m in enumerate(edges):                          # block max at the rounding edges, x 2^k
        if 3 + j >= out_f:
            break
        row = torch.rand(32, generator=g) * m * 0.9
        row[j % 32] = m if j % 2 else -m                   # the max once positive, once negative
        w[3 + j, :32] = row * 2.0 ** (j - 4)
    if out_f > 12 and in_f >= 64:
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])
        w[11, 32:32 + ties.numel()] = ties / 4             # with max 6/4 below: scale 2^-2 under CT
        w[11, 63] = 1.5
        w[12, 32:64] = -0.0                                # signed zeros and tiny negatives
        w[12, 40:48] = -1e-4
        w[12, 50] = 0.5
    return w


def build_source(tag: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a one-layer Llama in the tag's dtype with planted weights; return the fixture modules' weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype, hidden, inter, heads, head_dim = MODELS[tag]
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for i, (name, module) in enumerate(sorted(model.named_modules())):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(plant_cases(module.weight, seed=1000 * (seed + 1) + i, dtype=dtype))
    model = model.to(dtype)
    model.save_pretrained(path)
    state = model.state_dict()
    return {f"{m}.weight": state[f"{m}.weight"].contiguous() for m in FIXTURE_MODULES[tag]}


def run_producer(src: Path, scheme: str, dst: Path, dtype: torch.dtype) -> dict:
    """llm-compressor oneshot + compressed save; returns the quantization_config it wrote."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    model.save_pretrained(dst, save_compressed=True)
    return json.loads((dst / "config.json").read_text())["quantization_config"]


def main(argv: list[str] | None = None) -> None:
    import compressed_tensors
    import llmcompressor
    import transformers
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="weight seed (the committed fixtures use 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    versions = {"compressed_tensors": compressed_tensors.__version__, "llmcompressor": llmcompressor.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    meta = {k: str(v) for k, v in versions.items()}
    configs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, (dtype, *_rest) in MODELS.items():
            src = Path(tmp) / f"src_{tag}"
            weights = build_source(tag, src, args.seed)
            save_file(weights, args.out / f"source_{tag}.safetensors", metadata=meta)
            for name, scheme in SCHEMES.items():
                dst = Path(tmp) / f"{name}_{tag}"
                qcfg = run_producer(src, scheme, dst, dtype)
                if tag == "bf16":
                    configs[name] = qcfg
                saved = load_file(dst / "model.safetensors")
                keep = {k: v.contiguous() for k, v in saved.items()
                        if any(k.startswith(m + ".") for m in FIXTURE_MODULES[tag])}
                save_file(keep, args.out / f"{name}_{tag}.safetensors", metadata=meta)
                log.info("%s %s: %s", name, tag, {k: (str(v.dtype), tuple(v.shape)) for k, v in keep.items()})
    (args.out / "ct_config_groups.json").write_text(
        json.dumps({"versions": versions, "quantization_config": configs}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
