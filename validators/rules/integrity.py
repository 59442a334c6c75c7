"""QG6xx: checkpoint integrity (problems found while opening it) and config vs tensor shapes."""

from __future__ import annotations

from collections.abc import Iterator

from quantgate.validators.findings import Finding, Severity, VerdictStatus
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, LOADS_WRONG, WARNING, finding

#: problem code -> (severity, effect, the engine's error) for problems `open_checkpoint` records
PROBLEM_EFFECTS: dict[str, tuple[Severity, VerdictStatus | None, str]] = {
    "QG601": (ERROR, FAILS, "FileNotFoundError: [Errno 2] No such file or directory: '{file}'"),
    "QG602": (ERROR, FAILS, "safetensors_rust.SafetensorError: Error while deserializing header: {file}"),
    "QG603": (WARNING, None, ""),
    "QG604": (WARNING, None, ""),
    "QG605": (ERROR, FAILS, "refused: {file}"),
    "QG606": (ERROR, FAILS, "json.decoder.JSONDecodeError while reading {file}"),
}


def _problems(ctx: Context, code: str) -> Iterator[Finding]:
    severity, effect, error = PROBLEM_EFFECTS[code]
    for p in ctx.view.problems:
        if p.code == code:
            yield Finding(code=code, severity=severity, message=p.message, modules=tuple(p.files), fix=p.fix,
                          effect=effect, predicted_error=error.format(file=p.files[0] if p.files else "?"))


@rule("QG601", "missing-shard", ERROR, per_engine=False)
def missing_shard(ctx: Context) -> Iterator[Finding]:
    """model.safetensors.index.json names a shard file that does not exist.

    Why: the engines open every shard the index names; the load stops with FileNotFoundError (or,
    on the Hub, a 404) before any weight is read.

    Fix: upload the missing shard or regenerate the index.
    """
    yield from _problems(ctx, "QG601")


@rule("QG602", "corrupt-header", ERROR, per_engine=False)
def corrupt_header(ctx: Context) -> Iterator[Finding]:
    """A shard's safetensors header is corrupt, truncated, oversized or hostile (offsets outside the
    file, overlaps, holes, unknown dtypes).

    Why: safetensors refuses the file ("Error while deserializing header"); a truncated data section
    fails on the first read of a tensor past the end.

    Fix: re-download or re-export the shard; compare its size with the index's metadata.total_size.
    """
    yield from _problems(ctx, "QG602")


@rule("QG603", "index-mismatch", WARNING, per_engine=False)
def index_mismatch(ctx: Context) -> Iterator[Finding]:
    """The index's weight_map disagrees with the shards' contents (or a tensor is in two shards).

    Why: loaders that trust the index read the wrong shard or load a duplicate twice; tools that
    inspect only the index see a different checkpoint than the engine loads.

    Fix: regenerate model.safetensors.index.json from the shards.
    """
    yield from _problems(ctx, "QG603")


@rule("QG604", "unreferenced-shard", WARNING, per_engine=False)
def unreferenced_shard(ctx: Context) -> Iterator[Finding]:
    """A shard is on disk but the index does not reference it.

    Why: engines load only the shards the index lists; its tensors are ignored.

    Fix: delete the stray shard or add its tensors to the index.
    """
    yield from _problems(ctx, "QG604")


@rule("QG605", "hostile-index-entry", ERROR, per_engine=False)
def hostile_entry(ctx: Context) -> Iterator[Finding]:
    """An index entry is an absolute path, contains `..`, names a non-safetensors file, or a shard is a
    symlink leaving the checkpoint; it was refused and never opened.

    Why: a checkpoint must not make a loader read files outside itself or unpickle `.bin` files.

    Fix: use plain relative shard names inside the checkpoint directory.
    """
    yield from _problems(ctx, "QG605")


@rule("QG606", "unusable-json", ERROR, per_engine=False)
def unusable_json(ctx: Context) -> Iterator[Finding]:
    """config.json, hf_quant_config.json or the index is not a usable JSON object.

    Why: the engines parse these files at startup; a decode error stops the load.

    Fix: regenerate the file.
    """
    yield from _problems(ctx, "QG606")


@rule("QG607", "index-names-absent-tensor", ERROR)
def index_names_absent_tensor(ctx: Context) -> Iterator[Finding]:
    """model.safetensors.index.json lists a tensor under a shard that does not hold it, and no other
    shard does: the checkpoint is missing a tensor its own index promises.

    Why: the engines iterate the shards the index names and load what is there; nothing loads the
    missing tensor. vLLM checks that every parameter was loaded only for unquantized models
    ("ValueError: Following weights were not initialized from checkpoint", model_loader/default_loader.py);
    for quantized models (and always in SGLang) the parameter keeps its initial value: a missing
    scale stays `torch.empty` / 1.0 and the output is garbage (vllm PR #57108).

    Fix: re-upload the shard that lost the tensor, or re-export the checkpoint.
    """
    from quantgate.validators.layout import SCALE_SUFFIXES

    params = frozenset(SCALE_SUFFIXES) | {"weight", "weight_packed", "bias"}
    for p in ctx.view.problems:
        if p.code != "QG607":
            continue
        known = any(n.rpartition(".")[2] in params for n in p.files)     # a parameter the index promised
        strict = ctx.engine == "vllm" and not ctx.a.is_quantized
        effect = (FAILS if strict else LOADS_WRONG) if known else None
        error = ("ValueError: Following weights were not initialized from checkpoint: {" + repr(p.files[0]) + "}"
                 if strict else f"silent: {p.files[0]} is never loaded and keeps its initial value") if known else ""
        yield Finding(code="QG607", severity=ERROR, message=p.message, modules=tuple(p.files), fix=p.fix,
                      effect=effect, predicted_error=error)


#: no real decoder has more layers than this; larger config values are reported, never enumerated
MAX_LAYERS = 1 << 14


def _cfg(ctx: Context, *keys: str) -> int | None:
    config = ctx.view.config if isinstance(ctx.view.config, dict) else {}
    for scope in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in keys:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


@rule("QG610", "config-shape-mismatch", ERROR, per_engine=False)
def config_shapes(ctx: Context) -> Iterator[Finding]:
    """config.json's dimensions disagree with the tensors (hidden_size vs the embedding, vocab_size).

    Why: the engine sizes every parameter from config.json; `copy_` then fails with "The size of
    tensor a (X) must match the size of tensor b (Y)".

    Fix: ship the config.json the checkpoint was exported with.
    """
    hidden = _cfg(ctx, "hidden_size", "d_model", "n_embd")
    vocab = _cfg(ctx, "vocab_size")
    for m in (m for c in ctx.a.of_kind("embedding") for m in c.members):
        weight = m.tensors.get("weight")
        if weight is None or len(weight.shape) != 2 or "embed_tokens" not in m.name:
            continue
        rows, cols = weight.shape
        if hidden is not None and cols != hidden:
            yield finding("QG610", ERROR, f"{m.name} has hidden size {cols}, config.json says hidden_size {hidden}",
                          modules=[m.name], fix="Use the config.json the checkpoint was exported with.",
                          effect=FAILS, error=f"RuntimeError: The size of tensor a ({hidden}) must match the size "
                          f"of tensor b ({cols}) at non-singleton dimension 1")
        if vocab is not None and rows != vocab:
            yield finding("QG610", ERROR, f"{m.name} has {rows} rows, config.json says vocab_size {vocab}",
                          modules=[m.name], fix="Use the config.json the checkpoint was exported with.",
                          effect=FAILS, error=f"RuntimeError: The size of tensor a ({vocab}) must match the size "
                          f"of tensor b ({rows}) at non-singleton dimension 0")


@rule("QG611", "layer-count-mismatch", ERROR, per_engine=False)
def layer_count(ctx: Context) -> Iterator[Finding]:
    """Decoder-layer indices on disk disagree with config.json num_hidden_layers.

    Why: the engine builds config.json's layers: extra layers have no parameter ("There is no module or parameter named
    'model.layers.N...'"); missing layers stay uninitialised in quantized models.

    Fix: ship the matching config.json, or the missing shards.
    """
    n = _cfg(ctx, "num_hidden_layers", "n_layer", "num_layers")
    if n is None:
        return
    if n < 0 or n > MAX_LAYERS:
        yield finding("QG611", ERROR, f"config.json declares {n} layers", modules=["config.json"],
                      fix="Ship the config.json the checkpoint was exported with.", effect=FAILS,
                      error="ValueError: invalid num_hidden_layers")
        return
    layers = {m.layer for c in ctx.a.classes if c.kind not in ("vision", "projector", "other")
              for m in (c.members if c.kind != "expert" else c.members[:1]) if m.layer is not None}
    extra = sorted(x for x in layers if x >= n)
    if extra:
        yield finding("QG611", WARNING, f"layers {extra[:5]} exist on disk but config.json has {n} layers "
                      "(loaders skip them only when they are MTP / speculative-decoding layers)",
                      modules=[f"layers.{x}" for x in extra],
                      fix="Ship the matching config.json, or drop layers the model does not have.")
    missing = sorted(set(range(n)) - layers) if layers else []
    if missing and layers:
        yield finding("QG611", ERROR, f"config.json has {n} layers but {len(missing)} have no tensors",
                      modules=[f"layers.{x}" for x in missing], fix="Upload the shards holding those layers.",
                      effect=FAILS, error="ValueError: Following weights were not initialized from checkpoint")
