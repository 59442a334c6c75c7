"""Bulk scale reads of the deep rules, and the DeepSeek-V3 benchmark checkpoint writer behind them.

Small MoE checkpoints are written with `benchmarks.make_dsv3_checkpoint.write_shard` (real headers,
holes for weights, real F32 scalars) in both data orders: as safetensors writes a shard (F32
first, so a shard's scales are contiguous: the one-pread-per-class fast path) and in module order
(every scalar between two weights: the per-tensor path). Both must give every scale's exact value.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from benchmarks.make_dsv3_checkpoint import (
    ORDERS,
    Spec,
    bf16,
    config_json,
    data_order,
    nvfp4_linear,
    split_shards,
    write_shard,
)
from quantgate.validators.checkpoint import open_checkpoint
from quantgate.validators.layout import build_layout
from quantgate.validators.quant_config import parse_quant_config
from quantgate.validators.report import validate
from quantgate.validators.rules import Context
from quantgate.validators.rules._context import Analysis
from quantgate.validators.rules._values import _read_f32_scalars, _read_into, scale_table

LAYERS, EXPERTS, HIDDEN, INTER = 2, 8, 2048, 1024   # ~1 MB weights (holes): module order spreads
                                                     # a class's scalars over more than MAX_SPAN


def moe_specs() -> list[Spec]:
    """Two MoE layers of 8 experts (NVFP4), a BF16 router and norms, in module order."""
    specs = [bf16("model.embed_tokens.weight", 128, HIDDEN)]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        specs += [bf16(f"{p}.input_layernorm.weight", HIDDEN), bf16(f"{p}.mlp.gate.weight", EXPERTS, HIDDEN)]
        specs += nvfp4_linear(f"{p}.self_attn.o_proj", HIDDEN, HIDDEN, seed=layer)
        for e in range(EXPERTS):
            for i, (proj, out_f, in_f) in enumerate((("gate_proj", INTER, HIDDEN), ("up_proj", INTER, HIDDEN),
                                                      ("down_proj", HIDDEN, INTER))):
                specs += nvfp4_linear(f"{p}.mlp.experts.{e}.{proj}", out_f, in_f, seed=layer * 100 + e * 3 + i)
    return specs + [bf16("model.norm.weight", HIDDEN), bf16("lm_head.weight", 128, HIDDEN)]


def write_moe(root: Path, order: str, shards: int = 3) -> dict[str, float]:
    """The checkpoint in `root`; returns every scalar scale's value as stored (F32-rounded)."""
    root.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    parts = split_shards(moe_specs(), shards)
    for i, specs in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        write_shard(root / name, specs, order)
        weight_map.update(dict.fromkeys((s.name for s in specs), name))
    config = config_json()
    config.update(num_hidden_layers=LAYERS, n_routed_experts=EXPERTS, first_k_dense_replace=0,
                  hidden_size=HIDDEN, moe_intermediate_size=INTER)
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {s.name: struct.unpack("<f", struct.pack("<f", s.value))[0] for s in moe_specs() if s.value is not None}


def context(root: Path) -> Context:
    view = open_checkpoint(str(root))
    qc, qc_findings = parse_quant_config(view.config, view.hf_quant_config)
    ctx = Context(view=view, layout=build_layout(view.tensors, view.config), qc=qc, engines=("vllm", "sglang"),
                  deep=True, qc_findings=qc_findings)
    ctx.analysis = Analysis(ctx)
    return ctx


def table_values(ctx: Context) -> dict[str, float | None]:
    table = scale_table(ctx)
    return {m.tensors[suffix].name: v for (i, suffix), values in table.by_class.items()
            for m, v in zip(ctx.a.classes[i].members, values)}


def test_data_order_is_what_safetensors_writes() -> None:
    specs = nvfp4_linear("b.proj", 32, 64, seed=1) + nvfp4_linear("a.proj", 32, 64, seed=2) + [bf16("a.norm", 64)]
    assert [s.name for s in data_order(specs)] == [
        "a.proj.input_scale", "a.proj.weight_scale_2", "b.proj.input_scale", "b.proj.weight_scale_2",
        "a.norm", "a.proj.weight_scale", "b.proj.weight_scale", "a.proj.weight", "b.proj.weight"]
    assert data_order(specs, "module") == specs


@pytest.mark.parametrize("order", ORDERS)
def test_every_scale_is_read_exactly_in_both_orders(tmp_path: Path, order: str) -> None:
    expected = write_moe(tmp_path / order, order)
    ctx = context(tmp_path / order)
    assert table_values(ctx) == expected
    spread = [c for c in ctx.a.classes if len({m.tensors["input_scale"].file for m in c.members
                                               if "input_scale" in m.tensors}) > 1]
    assert spread                                 # some classes' scales sit in two shards
    jobs = [([None] * len(c.members), [m.tensors["input_scale"] for m in c.members]) for c in spread]
    left = _read_f32_scalars(ctx.view, jobs)      # one pread per class and shard, or per tensor
    assert (left == []) if order == "safetensors" else len(left) == sum(len(j[1]) for j in jobs)


def test_fast_path_agrees_with_per_tensor_reads_on_a_truncated_shard(tmp_path: Path) -> None:
    expected = write_moe(tmp_path / "ckpt", "safetensors")
    ctx = context(tmp_path / "ckpt")              # headers read while the shard is whole
    shard = tmp_path / "ckpt" / "model-00002-of-00003.safetensors"
    length = struct.unpack("<Q", shard.read_bytes()[:8])[0]
    with open(shard, "r+b") as f:                 # then cut in the middle of its F32 scalars
        f.truncate(8 + length + 4 * 7 + 2)
    got = table_values(ctx)
    per_tensor: dict[str, float | None] = dict.fromkeys(got)
    _read_into(ctx.view, [(per_tensor, name, ctx.view.tensors[name]) for name in per_tensor])
    assert got == per_tensor
    kept = [n for n, v in got.items() if v is not None]
    assert all(got[n] == expected[n] for n in kept)
    lost = {ctx.view.tensors[n].file for n, v in got.items() if v is None}
    assert lost == {shard.name}                   # only what lies past the cut is missing
    assert sum(ctx.view.tensors[n].file == shard.name for n in kept) == 7


def test_findings_do_not_depend_on_the_data_order(tmp_path: Path) -> None:
    reports = []
    for order in ORDERS:
        write_moe(tmp_path / order, order)
        report = validate(str(tmp_path / order))
        reports.append({k: v for k, v in report.to_dict().items() if k != "target"})
    assert reports[0] == reports[1]
    codes = {f["code"] for f in reports[0]["findings"]}
    assert "QG404" in codes                       # gate/up weight_scale_2 differ by construction
