"""Calibration throughput: tokens/s of `calibrate_model` on a synthetic Gemma4-style MoE.

Measures, on the same model and tokens: the plain forward (the model's own grouped_mm experts),
calibration with the real routing only, and calibration with every token through every expert
(the default). Prints one JSON object. Presets: `cpu` (a 30M-parameter model, seconds on 2 cores)
and `gpu` (the ModelOpt H100 anchor's Gemma4 MoE: hidden 2048, 12 layers, 64 experts top-8, width 1024).

    python -m benchmarks.calib_bench --preset cpu
    python -m benchmarks.calib_bench --preset gpu --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_experts": 32,
        "top_k_experts": 4,
        "moe_intermediate_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 8192,
        "samples": 16,
        "seq_len": 128,
        "batch_size": 4,
    },
    # the shape of the ModelOpt H100 anchor (shared/reference/anchors.md): 5.3B params, 64 x 512 tokens
    "gpu": {
        "hidden_size": 2048,
        "num_hidden_layers": 12,
        "num_experts": 64,
        "top_k_experts": 8,
        "moe_intermediate_size": 1024,
        "intermediate_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32000,
        "samples": 64,
        "seq_len": 512,
        "batch_size": 8,
    },
}


def build_model(preset: dict[str, Any], device: str) -> torch.nn.Module:
    import transformers

    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_experts",
        "top_k_experts",
        "moe_intermediate_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    )
    layers = preset["num_hidden_layers"]
    config = transformers.Gemma4TextConfig(
        **{k: preset[k] for k in keys},
        global_head_dim=preset["head_dim"],
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=preset["vocab_size"],
        enable_moe_block=True,
        sliding_window=512,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        tie_word_embeddings=True,
    )
    with torch.device(device):
        model = transformers.Gemma4ForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int = 2) -> float:
    fn()  # warm-up (kernels, allocator)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from quantgate.exporter.calibration.data import random_tokens
    from quantgate.exporter.calibration.forward import calibrate_model

    preset = PRESETS[args.preset]
    model = build_model(preset, args.device)
    params = sum(p.numel() for p in model.parameters())
    tokens = random_tokens(
        preset["vocab_size"], preset["samples"], preset["seq_len"], exclude=range(4), seed=0
    )
    batches = list(tokens.to(args.device).split(preset["batch_size"]))
    total = tokens.numel()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "router" not in n]
    layers = preset["num_hidden_layers"]
    targets += [
        f"model.layers.{i}.experts.{e}.{p}"
        for i in range(layers)
        for e in range(preset["num_experts"])
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    targets = [t for t in targets if t != "lm_head"]

    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch, use_cache=False, logits_to_keep=1)

    result: dict[str, Any] = {
        "preset": args.preset,
        "device": args.device,
        "params": params,
        "tokens": total,
        "targets": len(targets),
    }
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    result["forward_tokens_per_s"] = round(total / _timed(forward, args.device), 1)
    for all_experts in (False, True):
        seconds = _timed(
            lambda ae=all_experts: calibrate_model(model, targets, batches, all_experts=ae), args.device
        )
        result[f"calib_{'all_experts' if all_experts else 'routed'}_tokens_per_s"] = round(total / seconds, 1)
    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
