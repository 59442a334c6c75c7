"""QG140, QG44x: OpenAI's mxfp4 (GPT-OSS) - every MoE layer is six fused MXFP4 tensors, all else BF16.

Engine facts and sources: `validators/dialects_mxfp4.py` (vLLM `mxfp4.py`, `models/gpt_oss.py`;
SGLang `mxfp4.py`), reference formats_beyond_two.md §3.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.dialects_mxfp4 import FUSED_TENSORS, MISSING_EFFECT, dims
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, INFO, LOADS_WRONG, finding
from quantgate.validators.rules._context import BF16
from quantgate.validators.schemes import MXFP4

NEVER_QUANTIZED = frozenset({"norm", "embedding"})


def _applies(ctx: Context) -> bool:
    return ctx.qc is not None and ctx.qc.dialect == MXFP4


@rule("QG140", "mxfp4-exclusions-ignored", INFO, per_engine=False)
def exclusions_ignored(ctx: Context) -> Iterator[Finding]:
    """An mxfp4 config lists `modules_to_not_convert`: vLLM and SGLang never read it.

    Why: vLLM `Mxfp4Config.from_config` returns `cls()` (and SGLang's does the same): every Linear is
    built BF16 ("MXFP4 linear layer is not implemented") and every FusedMoE MXFP4, whatever the list
    says. The globs (`model.layers.*.self_attn`) are honoured by transformers only.

    Fix: nothing to fix for serving; do not rely on the list to keep an MoE layer BF16 (impossible here).
    """
    if not _applies(ctx) or not ctx.qc.params or not ctx.qc.params.modules_to_not_convert:
        return
    entries = ctx.qc.params.modules_to_not_convert
    yield finding("QG140", INFO, f"modules_to_not_convert ({len(entries)} entries: {', '.join(entries[:4])}"
                  f"{' ...' if len(entries) > 4 else ''}) is ignored by vLLM and SGLang for mxfp4: Linear layers "
                  "are always BF16, every MoE layer MXFP4", modules=[ctx.qc.source],
                  fix="Keep attention, routers, embeddings and lm_head BF16; quantize every MoE layer.")


@rule("QG440", "mxfp4-experts-not-mxfp4", ERROR, per_engine=False)
def experts_not_mxfp4(ctx: Context) -> Iterator[Finding]:
    """An MoE layer of an mxfp4 checkpoint is not stored as the fused MXFP4 tensors (BF16 experts, or
    per-expert 2-D tensors).

    Why: no engine can exclude an MoE layer under mxfp4 (`Mxfp4MoEMethod` for every FusedMoE). vLLM
    `gpt_oss.py::_load_weights_mxfp4` views a BF16 `gate_up_proj` [E, H, 2I] as [E, 2I, -1] and copies
    it into the U8 `w13_weight` [E, 2I, H/2]: a size-mismatch RuntimeError (a dequantized fine-tune
    that kept the original config; vllm #45830, #22380). Per-expert 2-D MXFP4 tensors crash the MXFP4
    branch of `FusedMoE.weight_loader` with IndexError (vllm #35324).

    Fix: re-quantize the experts to the fused MXFP4 form, or drop `quantization_config` and serve BF16.
    """
    if not _applies(ctx):
        return
    fused_bf16: list[str] = []
    per_expert: list[str] = []
    width = 0
    for cls in ctx.a.of_kind("expert"):
        if cls.rep.fused is None:
            per_expert.extend(cls.names)
        elif cls.state.state == BF16 or (cls.state.scheme is not None and cls.state.scheme.dialect != MXFP4):
            fused_bf16.extend(cls.names)
            width = width or (cls.rep.in_features if cls.rep.role != "down" else cls.rep.out_features) or 0
    if fused_bf16:
        yield finding("QG440", ERROR, f"{len(fused_bf16)} expert modules are stored BF16 while the config says "
                      "mxfp4; both engines build every MoE layer MXFP4", modules=fused_bf16,
                      fix="Quantize the experts to MXFP4 (fused _blocks/_scales/_bias) or remove quantization_config.",
                      effect=FAILS, error=f"RuntimeError: The size of tensor a ({width // 2}) must match the size of "
                                          f"tensor b ({width}) at non-singleton dimension 2")
    if per_expert:
        yield finding("QG440", ERROR, f"{len(per_expert)} expert modules are stored per expert; GPT-OSS mxfp4 "
                      "loads only the fused per-layer tensors", modules=per_expert,
                      fix="Store each MoE layer as experts.{gate_up,down}_proj_{blocks,scales,bias}.", effect=FAILS,
                      error="IndexError: tuple index out of range (loaded_weight.shape[2] in FusedMoE.weight_loader)")


def _sizes(ctx: Context) -> tuple[int | None, int | None, int | None]:
    config = ctx.view.config or {}

    def get(key: str) -> int | None:
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return ctx.a.layout.num_experts, get("intermediate_size"), get("hidden_size")


@rule("QG441", "mxfp4-fused-tensors", ERROR, per_engine=False)
def fused_tensors(ctx: Context) -> Iterator[Finding]:
    """An MXFP4 MoE layer lacks one of its six fused tensors, or one has the wrong dtype or shape for
    the config (E = num_local_experts, I = intermediate_size, H = hidden_size).

    Why: vLLM `Mxfp4MoEMethod.create_weights` sizes `w13_weight` [E, 2I, H/2] U8, `w13_weight_scale`
    [E, 2I, H/32] U8 and `w13_bias` [E, 2I] from the config; a different shape fails in the copy. A
    missing tensor is never reported: quantized models skip `track_weights_loading` (vllm PR #57108),
    so the parameter keeps its initial value and the experts output garbage.

    Fix: re-export the layer with all six tensors: experts.{gate_up,down}_proj_{blocks,scales,bias}.
    """
    if not _applies(ctx):
        return
    experts, inter, hidden = _sizes(ctx)
    layers = sorted({c.moe_group for c in ctx.a.of_kind("expert") if c.moe_group and c.rep.fused is not None})
    missing: dict[str, list[str]] = defaultdict(list)
    bad_dtype: dict[tuple, list[str]] = defaultdict(list)
    bad_shape: dict[tuple, list[str]] = defaultdict(list)
    tensors = ctx.view.tensors
    for moe in layers:
        if f"{moe}.gate_up_proj" in tensors or f"{moe}.down_proj" in tensors:
            continue        # BF16 experts: QG440
        for name, (dtypes, shape) in FUSED_TENSORS.items():
            info = tensors.get(f"{moe}.{name}")
            if info is None:
                missing[name.rpartition("_")[2]].append(f"{moe}.{name}")
                continue
            if info.dtype not in dtypes:
                bad_dtype[(name, info.dtype, dtypes[0])].append(info.name)
            if None not in (experts, inter, hidden):
                want = dims(shape, experts, inter, hidden)
                if tuple(info.shape) != want:
                    bad_shape[(name, tuple(info.shape), want)].append(info.name)
    for kind, names in sorted(missing.items()):
        yield finding("QG441", ERROR, f"{len(names)} MXFP4 expert tensor(s) are missing (`*_{kind}`)", modules=names,
                      fix="Re-export every MoE layer with its six fused tensors.", effect=LOADS_WRONG,
                      error="silent: " + MISSING_EFFECT[kind])
    for (name, got, want), names in sorted(bad_dtype.items()):
        yield finding("QG441", ERROR, f"`{name}` is {got} in {len(names)} layer(s); {want} expected", modules=names,
                      fix=f"Store `{name}` as {want}.", effect=LOADS_WRONG,
                      error=f"silent: {got} values numerically converted to {want}")
    for (name, got, want), names in sorted(bad_shape.items()):
        dim = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), 0)
        yield finding("QG441", ERROR, f"`{name}` has shape {list(got)} in {len(names)} layer(s); the config gives "
                      f"{list(want)}", modules=names, fix="Fix the config sizes or re-export the experts.",
                      effect=FAILS, error=f"RuntimeError: The size of tensor a ({want[dim] if dim < len(want) else 0}) "
                      f"must match the size of tensor b ({got[dim] if dim < len(got) else 0}) at non-singleton "
                      f"dimension {dim}")


@rule("QG442", "mxfp4-linear-quantized", ERROR, per_engine=False)
def linear_quantized(ctx: Context) -> Iterator[Finding]:
    """A non-expert module carries quantized tensors in an mxfp4 checkpoint.

    Why: both engines build every Linear BF16 under mxfp4 ("MXFP4 linear layer is not implemented",
    vLLM `mxfp4.py`); `gpt_oss.py::_load_weights_mxfp4` skips names it has no parameter for with a
    warning, so the BF16 weight of that layer is never loaded.

    Fix: keep attention, routers, embeddings and lm_head BF16 in mxfp4 checkpoints.
    """
    if not _applies(ctx):
        return
    names = [n for c in ctx.a.quantized_classes if c.kind != "expert" and c.kind not in NEVER_QUANTIZED
             for n in c.names]
    if names:
        yield finding("QG442", ERROR, f"{len(names)} non-expert module(s) are quantized; mxfp4 engines build every "
                      "Linear BF16", modules=names, fix="Store these modules BF16.", effect=LOADS_WRONG,
                      error="silent: 'Weight ... not found in params_dict ... will be ignored'; the BF16 weight "
                            "stays uninitialised")

