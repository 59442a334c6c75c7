"""The deep screen of native fp8 block scales (`weight_scale_inv`): every value of every block scale,
in both shard data orders, read without torch; the DeepSeek-V3 benchmark writer's fp8 form."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.make_dsv3_checkpoint import (
    ORDERS,
    Spec,
    bf16,
    config_json,
    fp8_block_linear,
    layer_specs,
    split_shards,
    write_shard,
)
from quantgate.validators.report import validate

REPO = Path(__file__).resolve().parents[2]
LAYERS, EXPERTS, HIDDEN, INTER = 2, 8, 1024, 512
BAD = {"model.layers.1.mlp.experts.5.up_proj.weight_scale_inv": 0.0,
       "model.layers.0.mlp.experts.2.down_proj.weight_scale_inv": float("nan"),
       "model.layers.1.self_attn.o_proj.weight_scale_inv": -1e-3,
       "model.layers.0.mlp.experts.7.gate_proj.weight_scale_inv": float("inf")}


def fp8_moe_specs() -> list[Spec]:
    """Two MoE layers of 8 fp8-block experts with a few broken block scales, in module order."""
    specs = [bf16("model.embed_tokens.weight", 128, HIDDEN)]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        specs += [bf16(f"{p}.input_layernorm.weight", HIDDEN), bf16(f"{p}.mlp.gate.weight", EXPERTS, HIDDEN),
                  Spec(f"{p}.mlp.gate.e_score_correction_bias", "F32", (EXPERTS,), -0.25)]   # negative, not a scale
        specs += fp8_block_linear(f"{p}.self_attn.o_proj", HIDDEN, HIDDEN, seed=layer)
        for e in range(EXPERTS):
            for i, (proj, out_f, in_f) in enumerate((("gate_proj", INTER, HIDDEN), ("up_proj", INTER, HIDDEN),
                                                      ("down_proj", HIDDEN, INTER))):
                specs += fp8_block_linear(f"{p}.mlp.experts.{e}.{proj}", out_f, in_f, seed=layer * 100 + e * 3 + i)
    specs = [replace(s, value=BAD[s.name]) if s.name in BAD else s for s in specs]
    return specs + [bf16("model.norm.weight", HIDDEN), bf16("lm_head.weight", 128, HIDDEN)]


def write_fp8_moe(root: Path, order: str, shards: int = 3) -> Path:
    root.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    parts = split_shards(fp8_moe_specs(), shards)
    for i, specs in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        write_shard(root / name, specs, order)
        weight_map.update(dict.fromkeys((s.name for s in specs), name))
    config = config_json("fp8")
    config.update(num_hidden_layers=LAYERS, n_routed_experts=EXPERTS, first_k_dense_replace=0,
                  hidden_size=HIDDEN, moe_intermediate_size=INTER, vocab_size=128)
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def _codes(report) -> dict[str, list[str]]:
    return {f.code: list(f.modules) for f in report.findings}


@pytest.mark.parametrize("order", ORDERS)
def test_every_bad_block_scale_is_found_in_both_orders(tmp_path: Path, order: str) -> None:
    report = validate(str(write_fp8_moe(tmp_path / order, order)))
    codes = _codes(report)
    nonfinite = sorted(n for n, v in BAD.items() if not math.isfinite(v))
    nonpositive = sorted(n for n, v in BAD.items() if math.isfinite(v) and v <= 0)
    assert codes.get("QG501") == nonfinite and codes.get("QG502") == nonpositive, codes
    assert {v["status"] for v in report.verdicts.values()} == {"loads_wrong"}
    assert report.dialect == "fp8" and report.scheme == "FP8_BLOCK"


def test_block_scales_are_screened_only_when_deep(tmp_path: Path) -> None:
    root = write_fp8_moe(tmp_path / "ck", "safetensors")
    assert {"QG501", "QG502"} <= set(_codes(validate(str(root))))
    assert not {"QG501", "QG502"} & set(_codes(validate(str(root), deep=False)))


def test_dsv3_fp8_layer_specs_follow_the_official_form() -> None:
    specs = {s.name: s for s in layer_specs(3, "fp8")}
    gate = specs["model.layers.3.mlp.experts.0.gate_proj.weight"]
    inv = specs["model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv"]
    assert (gate.dtype, gate.shape) == ("F8_E4M3", (2048, 7168))
    assert (inv.dtype, inv.shape) == ("F32", (16, 56)) and inv.value > 0
    kv_a = specs["model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert kv_a.shape == (5, 56)                                   # ceil(576/128), ceil(7168/128)
    assert "model.layers.3.mlp.gate.weight" in specs and not any(n.endswith("weight_scale_2") for n in specs)
    assert config_json("fp8")["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def test_fp8_validation_never_imports_torch(tmp_path: Path) -> None:
    root = write_fp8_moe(tmp_path / "ck", "safetensors")
    code = ("import sys; from service.cli import main; rc = main(['validate', %r, '--format', 'json']); "
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', rc, file=sys.stderr)" % str(root))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "NOTORCH 1" in done.stderr, done.stderr[-2000:]
