"""QG21x: ModelOpt MIXED_PRECISION checkpoints (per-module `quantized_layers`, invariant 24).

The coverage rules already treat a module absent from `quantized_layers` as built unquantized
(`Analysis._forced` -> "not_listed": QG203 when its bytes are quantized) and a listed BF16 module
as built quantized (QG201/QG202). These rules add what is specific to the map itself: the shards
of one engine layer must agree on the algo, and the map must be usable and name real modules.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, WARNING, finding
from quantgate.validators.rules._context import QUANTIZED
from quantgate.validators.schemes import MIXED_PRECISION, MIXED_PRECISION_ALGOS


def _is_mixed(ctx: Context) -> bool:
    qc = ctx.qc
    return qc is not None and qc.is_modelopt and qc.quant_algo == MIXED_PRECISION


@rule("QG211", "mixed-algo-in-fused-layer", ERROR)
def mixed_algo_in_fused_layer(ctx: Context) -> Iterator[Finding]:
    """The shards of one engine layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj, or the routed
    experts of one MoE layer) are given different algos in `quantized_layers`.

    Why: invariant 24. The engine builds one quantization method per layer: vLLM's
    `ModelOptMixedPrecisionConfig._resolve_quant_algo` raises "ValueError: Mixed quant_algo within
    fused layer <prefix>" for a fused linear, and resolves a MoE layer by the first key below its
    prefix, so experts listed (and stored) in another format load into the wrong parameters.

    Fix: give every shard of a fused layer, and every expert of a MoE layer, the same algo (the
    `auto` recipe's decision groups guarantee it), or leave them all BF16 and unlisted.
    """
    if not ctx.a.active or not _is_mixed(ctx):
        return
    engine = ctx.engine or "vllm"
    by_unit: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for cls, c in zip(ctx.a.classes, ctx.a.coverage(engine)):
        if c.unit == c.engine_name or c.excluded or c.conflict is not None or cls.state.state != QUANTIZED:
            continue
        for module in cls.members:
            algo = ctx.a.mixed_algo(module, module.name if module is not cls.rep else c.engine_name)
            by_unit[c.unit][algo or "?"].append(module.name)
    for unit, by_algo in sorted(by_unit.items()):
        if len(by_algo) < 2:
            continue
        algos = sorted(by_algo)
        minority = min(by_algo.values(), key=len)
        summary = ", ".join(f"{len(by_algo[a])} {a}" for a in algos)
        yield finding("QG211", ERROR, f"shards of {unit} are declared with different algos ({summary})",
                      modules=minority, fix=f"List every shard of {unit} with one quant_algo.", effect=FAILS,
                      error=f"ValueError: Mixed quant_algo within fused layer {unit}: {set(algos)}. All shards "
                      "must use the same quantization.", algos=algos)


@rule("QG212", "mixed-precision-map", ERROR, per_engine=False)
def mixed_precision_map(ctx: Context) -> Iterator[Finding]:
    """A MIXED_PRECISION config has no usable `quantized_layers` map, lists an algo the engines do not
    build per layer, or lists names that match no module of the checkpoint.

    Why: invariants 2 and 24. vLLM's `ModelOptMixedPrecisionConfig._from_config` raises
    "MIXED_PRECISION quant_algo requires a non-empty 'quantized_layers' mapping"; a per-layer algo
    outside FP8 / NVFP4 / W4A16_NVFP4 leaves the module unquantized (its scales then fail to load);
    an entry naming no module (a renamed prefix, a stale export) quantizes nothing and hides which
    modules were meant to be quantized.

    Fix: write one entry per quantized module, under the checkpoint's module names, with quant_algo
    FP8, NVFP4 or W4A16_NVFP4.
    """
    if not _is_mixed(ctx):
        return
    layers = ctx.qc.quantized_layers or {}
    if not layers:
        yield finding("QG212", ERROR, "quant_algo is MIXED_PRECISION but `quantized_layers` is missing or empty",
                      modules=[ctx.qc.source], fix="List every quantized module in quantized_layers.",
                      effect=FAILS, error="ValueError: MIXED_PRECISION quant_algo requires a non-empty "
                      "'quantized_layers' mapping in the quantization config.")
        return
    unsupported = sorted(n for n, spec in layers.items() if spec.get("quant_algo") not in MIXED_PRECISION_ALGOS)
    if unsupported:
        algos = sorted({str(layers[n].get("quant_algo")) for n in unsupported})
        yield finding("QG212", ERROR, f"{len(unsupported)} quantized_layers entr{'y' if len(unsupported) == 1 else 'ies'} "
                      f"use algos the engines do not build per layer ({', '.join(algos)})", modules=unsupported,
                      fix=f"Use one of {', '.join(MIXED_PRECISION_ALGOS)} per layer.", effect=FAILS,
                      error="silent: the layer is built unquantized and its scale tensors have no parameter")
    names = sorted(ctx.layout.modules)
    stale = [key for key in sorted(layers) if not _names_module(key, names)]
    if stale:
        yield finding("QG212", WARNING, f"{len(stale)} quantized_layers entr{'y' if len(stale) == 1 else 'ies'} "
                      f"match no module of the checkpoint: {', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}",
                      modules=stale, fix="Write quantized_layers keys as the checkpoint's module names.")
    implicit = [m.name for cls in ctx.a.quantized_classes for m in cls.members
                if not _listed(m.name, layers) and ctx.a.mixed_algo(m, m.name) is not None]
    if implicit:
        yield finding("QG212", WARNING, f"{len(implicit)} quantized module(s) are not listed in quantized_layers; "
                      "vLLM and SGLang resolve them through their layer's other entries, readers that look "
                      "modules up by name treat them as BF16", modules=implicit,
                      fix="List every quantized module (or its fused-experts container) in quantized_layers.")


def _names_module(key: str, names: list[str]) -> bool:
    """`key` is a module name, or the container of some (e.g. a fused-experts `...mlp.experts`)."""
    i = bisect_left(names, key)
    return i < len(names) and (names[i] == key or names[i].startswith(key + "."))


def _listed(name: str, layers: dict) -> bool:
    """`name` or one of its containers (ModelOpt keys fused experts by `...experts`) is a key."""
    parts = name.split(".")
    return any(".".join(parts[:k]) in layers for k in range(len(parts), 0, -1))
