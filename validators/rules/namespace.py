"""QG701: every tensor name must land in the model's own parameter name space after the engine's mapper."""

from __future__ import annotations

from collections.abc import Iterator

from quantgate.validators import engine_facts as ef
from quantgate.validators.engines import ENGINE_SEMANTICS
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, LOADS_WRONG, finding

#: components that wrap a decoder stack; one never directly contains another of them
WRAPPER_WORDS = frozenset({"model", "language_model", "text_model", "base_model"})
#: leading components that decide where a tensor lands (the mapper rewrites at most the first three)
HEAD_PARTS = 4


def _head(name: str) -> str:
    return ".".join(name.split(".", HEAD_PARTS)[:HEAD_PARTS])


def _key(name: str) -> str:
    """What decides where a name lands: the part up to `.layers` for decoder layers, else the head."""
    pre, sep, _ = name.partition(".layers.")
    return pre + ".layers" if sep else _head(name)


def name_keys(ctx: Context) -> dict[str, str]:
    """Distinct `_key`s of every module and loose tensor (46k modules of DeepSeek-V3 -> a few keys),
    computed once per validation for both engines."""
    cache = ctx.a.__dict__.get("_name_keys")
    if cache is None:
        layout = ctx.a.layout
        cache = {}
        for name in (*layout.modules, *layout.unassigned):
            cache.setdefault(_key(name), name)
        ctx.a.__dict__["_name_keys"] = cache
    return cache


def _doubled_wrapper(name: str, words: frozenset[str] | None = WRAPPER_WORDS) -> str | None:
    """`model.language_model.language_model.layers` -> `model.language_model.language_model`; with
    `words=None` any repeated non-numeric component (`layers.0.moe.moe.experts`) counts."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == parts[i - 1] and (parts[i] in words if words is not None else not parts[i].isdigit()):
            return ".".join(parts[:i + 1])
    return None


def _misplaced(ename: str, roots: ef.NameRoots) -> str | None:
    """The offending prefix of an engine-side name, or None when it is one of the model's own names."""
    for root in roots.other:
        if ename == root or ename.startswith(root + "."):
            return None
    for root in roots.text:
        if ename.startswith(root + "."):
            child = ename[len(root) + 1:].split(".", 1)[0]
            return f"{root}.{child}" if child in WRAPPER_WORDS else None
    return ename.split(".", 1)[0]


def _misplaced_experts(unit: str, experts_at: str) -> str | None:
    """`model.layers.0.moe.experts` where the engine builds `layers.N.experts` -> `model.layers.0.moe`."""
    base, sep, rest = unit.partition(".layers.")
    layer, _, inner = rest.partition(".")
    if not sep or not layer.isdigit() or inner == experts_at:
        return None
    want, got = experts_at.split("."), inner.split(".")
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return ".".join([base, "layers", layer, *got[:i + 1]])


def _engine_head(ctx: Context, engine: str, head: str) -> str | None:
    """`head` in the engine's name space. Mapped with a trailing dot, as a prefix of the tensor names
    below it: a module named exactly `lm_head` must meet the mappers' `lm_head.` prefix rules."""
    mapper = ctx.a.engine_fact(engine, ef.NAME_MAPPER)
    if mapper is not None:
        mapped = mapper.map(head + ".")
    else:
        mapped = ENGINE_SEMANTICS[engine].engine_name(head + ".", ctx.a.architecture)
    return mapped[:-1] if mapped and mapped.endswith(".") else mapped


@rule("QG701", "outside-model-name-space", ERROR)
def outside_name_space(ctx: Context) -> Iterator[Finding]:
    """A tensor name does not map into the model's own parameter names after the engine's name mapper
    (a doubled wrapper such as `model.language_model.language_model.`, a wrapper the architecture does
    not have, an unknown top-level module), or routed experts sit under another block than the engine
    builds at that release (engine_facts EXPERTS_AT, e.g. Gemma4 `moe.experts` vs vLLM 0.31's `experts`),
    or the model loader's own rename doubles a component (vLLM < 0.25 Gemma4 `moe.moe.experts`).

    Why: the engine looks every checkpoint name up among its parameters after the model's
    `hf_to_vllm_mapper`. vLLM's AutoWeightsLoader raises "ValueError: There is no module or parameter
    named 'X' in <Model>" (vllm/model_executor/models/utils.py), hand-written loaders raise
    `KeyError` (deepseek_v2.py `params_dict[name]`); SGLang's loaders skip unknown names (`if name not
    in params_dict: continue`), so the parameter keeps its initial values: garbage output
    (llm-compressor #2568 wrote `language_model.language_model.` prefixes).

    Fix: rename the tensors to the architecture's own prefixes (re-save with the transformers version
    the engine expects), or fix `architectures` in config.json.
    """
    engine = ctx.engine or "vllm"
    roots: ef.NameRoots | None = ctx.a.engine_fact(engine, ef.NAME_ROOTS)
    bad: dict[str, list[str]] = {}
    examples: dict[str, str] = {}
    for head, example in name_keys(ctx).items():
        ename = _engine_head(ctx, engine, head)
        if ename is None:
            continue                            # dropped by the mapper (mtp., other towers)
        offending = (_misplaced(ename, roots) if roots is not None else None) or _doubled_wrapper(ename) \
            or _doubled_wrapper(head)
        if offending is not None:
            bad.setdefault(offending, []).append(head)
            examples.setdefault(offending, _engine_head(ctx, engine, example) or example)
    renamed: list[str] = []         # misplaced after the model loader's own renames
    experts_at = ctx.a.engine_fact(engine, ef.EXPERTS_AT)
    for cls, cov in zip(ctx.a.classes, ctx.a.coverage(engine)):
        offending = _doubled_wrapper(cov.engine_name, None)         # vLLM < 0.25 Gemma4: moe.moe.experts
        if offending is not None and _doubled_wrapper(cls.rep.name, None) is not None:
            offending = None                                        # already doubled on disk: reported above
        if offending is None and experts_at and cls.kind == "expert":
            offending = _misplaced_experts(cov.unit, experts_at)
        if offending is not None:
            bad.setdefault(offending, [])
            examples.setdefault(offending, cov.engine_name)
            renamed.extend(t.name for m in cls.members for t in m.tensors.values())
    if not bad:
        return
    bad_heads = {h for hs in bad.values() for h in hs}
    names = [n for n in ctx.view.tensors if _key(n) in bad_heads] + renamed
    first = sorted(bad)[0]
    behaviour = ctx.a.engine_fact(engine, ef.UNKNOWN_NAME, "raises")
    arch = ctx.a.architecture or "the model"
    if behaviour == "skips":
        effect, error = LOADS_WRONG, (f"silent: '{examples[first]}' matches no parameter; the loader skips it and "
                                      "the parameter keeps its initial values")
    elif behaviour == "keyerror":
        effect, error = FAILS, f"KeyError: '{examples[first]}'"
    else:
        effect, error = FAILS, f"ValueError: There is no module or parameter named '{first}' in {arch}"
    yield finding("QG701", ERROR, f"{len(names)} tensor(s) lie outside {arch}'s parameter names after the "
                  f"engine's name mapper ({', '.join(sorted(bad)[:3])})", modules=names,
                  fix="Rename the tensors to the architecture's own prefixes (no doubled wrapper), or fix "
                  "`architectures` in config.json.", effect=effect, error=error, prefixes=sorted(bad))
