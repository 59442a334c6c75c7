"""The structural map of a checkpoint: every weight-bearing module, its kind, layer, expert and groups.

Built from tensor names, shapes and config.json alone (no tensor data, no model code), for BF16
sources and quantized exports alike: a module is a tensor name minus its last component when that
component is `weight`, `weight_packed`, `bias` or a quantization suffix (`SCALE_SUFFIXES`). Fused 3-D
expert tensors (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I], and the transposed
GPT-OSS / Llama4 forms) are expanded into virtual per-expert modules named like the per-expert
modules ModelOpt writes (`<experts>.{e}.gate_proj`), so a BF16 source and its quantized export lay
out identically. All naming knowledge is in `layout_table.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from quantgate.validators.layout_table import (
    COMPILED_GLOBAL_ROWS,
    COMPILED_TAIL_ROWS,
    CONTEXT_KINDS,
    CONTEXT_RE,
    FUSED_EXPERT_FORMATS,
    FUSED_GROUPS,
    FUSED_TENSOR_RE,
    HIDDEN_KEYS,
    LAYER_RE,
    MTP_ROLE,
    NORM_RE,
    NUM_EXPERTS_KEYS,
    NUM_LAYERS_KEYS,
    ROLES,
    TEXT_CONFIG_KEYS,
    FusedExpertFormat,
    FusedWeight,
    Kind,
)
from quantgate.validators.safetensors_header import gc_paused
from quantgate.validators.layout_schemes import fused_weight as _fused_weight
from quantgate.validators.layout_schemes import scheme_logical_shape as _scheme_logical_shape
from quantgate.validators.schemes import EXTRA_QUANT_SUFFIXES, SCHEME_SUFFIXES, SCHEMES, WEIGHT_SUFFIXES, scheme

if TYPE_CHECKING:
    from quantgate.validators.safetensors_header import TensorInfo

__all__ = ["SCALE_SUFFIXES", "FusedSlice", "Kind", "Layout", "Module", "build_layout"]

#: Every suffix a quantized module may carry besides its weight (from the scheme table).
SCALE_SUFFIXES: tuple[str, ...] = tuple(sorted((SCHEME_SUFFIXES - WEIGHT_SUFFIXES) | EXTRA_QUANT_SUFFIXES))
#: Suffixes that make a group of tensors a module (KV-cache scales and biases alone do not).
_MODULE_MARKERS = frozenset((SCHEME_SUFFIXES | EXTRA_QUANT_SUFFIXES) - {"k_scale", "v_scale", "q_scale"})
_MODULE_SUFFIXES = frozenset(SCALE_SUFFIXES) | WEIGHT_SUFFIXES | {"bias"}
#: (weight suffix, dtype) -> logical input elements per stored element (U8 NVFP4 -> 2, I32 int4 -> 8).
_IN_PACK: dict[tuple[str, str], int] = {
    (s.weight_suffix, s.weight_spec.dtypes[0]): s.in_pack for s in SCHEMES}
#: the same for a plain `weight`, by dtype (the layout's hot path: no key tuple per module)
_WEIGHT_IN_PACK: dict[str, int] = {dtype: pack for (suffix, dtype), pack in _IN_PACK.items() if suffix == "weight"}


@dataclass(frozen=True, slots=True)
class FusedSlice:
    """Where a virtual per-expert module lives inside a fused 3-D tensor.

    `rows` is the slice of the per-expert matrix's out dim ([out, in] orientation) that belongs to
    this module: gate = (0, I), up = (I, 2I); None for a whole matrix (down_proj). With `interleaved`
    (GPT-OSS) the out dim alternates gate/up, so gate is out-index 0::2 and up 1::2; `rows` then still
    names the half in de-interleaved order. With `transposed` the tensor is stored [E, in, out].
    """

    tensor: str
    expert: int
    rows: tuple[int, int] | None
    transposed: bool
    interleaved: bool


class Module(NamedTuple):
    """One weight-bearing module, named as on disk (virtual per-expert names for fused experts).

    Immutable. A NamedTuple rather than a frozen dataclass for the same reason as `TensorInfo`: a
    DeepSeek-V3 layout builds ~45k of them, and a tuple is built with one C call (`_module`) where a
    frozen dataclass pays one setter call per field. Construct it by keyword or position.
    """

    name: str
    kind: Kind
    layer: int | None
    expert: int | None
    role: str | None
    fused_group: str | None
    moe_group: str | None
    tensors: dict[str, TensorInfo]  # suffix -> tensor ("weight", "weight_scale", ...)
    fused: FusedSlice | None
    out_features: int | None  # logical (unquantized) [out, in]
    in_features: int | None


_new_tuple = tuple.__new__


def _module(name: str, kind: Kind, layer: int | None, expert: int | None, role: str | None,
            fused_group: str | None, moe_group: str | None, tensors: dict[str, TensorInfo],
            fused: FusedSlice | None, out_features: int | None, in_features: int | None) -> Module:
    """`Module(...)` through the C tuple constructor (equal result, no Python-level __new__)."""
    return _new_tuple(Module, (name, kind, layer, expert, role, fused_group, moe_group, tensors, fused,
                               out_features, in_features))


@dataclass
class Layout:
    """Every module of a checkpoint, sorted by name, plus what the config says about its size."""

    architecture: str | None
    modules: dict[str, Module]
    num_layers: int | None
    num_experts: int | None
    unassigned: list[str]

    def by_kind(self, kind: Kind) -> list[Module]:
        return [m for m in self.modules.values() if m.kind is kind]


@dataclass(frozen=True, slots=True)
class _TailMatch:
    kind: Kind
    role: str | None
    fused_rel: str | None  # fused group relative to the layer base, with a leading "."
    moe_rel: str | None
    expert: int | None
    fused_experts: bool
    experts_rel: str | None  # fused 3-D: the experts container relative to the layer base


class _Config:
    """The few config values the layout needs; multimodal wrappers keep them in text_config."""

    def __init__(self, config: Mapping[str, Any] | None) -> None:
        top = config if isinstance(config, Mapping) else {}
        scopes = [top] + [top[k] for k in TEXT_CONFIG_KEYS if isinstance(top.get(k), Mapping)]
        self.scopes = scopes
        archs = top.get("architectures")
        first = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        model_type = top.get("model_type") if isinstance(top.get("model_type"), str) else None
        self.architecture: str | None = first or model_type
        text_types = [s.get("model_type") for s in reversed(scopes) if isinstance(s.get("model_type"), str)]
        self.fused_format: FusedExpertFormat | None = next(
            (FUSED_EXPERT_FORMATS[t] for t in text_types if t in FUSED_EXPERT_FORMATS), None)
        self.num_layers = self.int_value(NUM_LAYERS_KEYS)
        self.num_experts = self.int_value(NUM_EXPERTS_KEYS)
        self.hidden = self.int_value(HIDDEN_KEYS)

    def int_value(self, keys: tuple[str, ...]) -> int | None:
        for key in keys:
            for scope in reversed(self.scopes):  # text_config first: a wrapper's top level may differ
                value = scope.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    return value
        return None


@lru_cache(maxsize=65536)
def _match_tail(tail: str) -> _TailMatch | None:
    """Match the part of a name after `layers.N.` against the table (cached: tails repeat per layer)."""
    for pattern, row in COMPILED_TAIL_ROWS:
        m = pattern.fullmatch(tail)
        if m is None:
            continue
        groups = m.groupdict()
        blk, proj, expert = groups.get("blk"), groups["proj"], groups.get("expert")
        role = ROLES.get(proj)
        base = f".{blk}" if blk else ""
        group = FUSED_GROUPS.get(role) if role else None
        if expert is not None:
            fused_rel = f"{base}.{expert}.{group}" if group else None
        else:
            fused_rel = f"{base}.{group}" if group else None
        is_expert = row.kind is Kind.EXPERT
        return _TailMatch(row.kind, role, fused_rel, base if is_expert else None,
                          int(expert) if expert is not None else None, row.fused_experts,
                          base if row.fused_experts else None)
    return None


@lru_cache(maxsize=4096)
def _context(prefix: str) -> Kind | None:
    """Kind forced by a prefix (vision tower, projector, MTP head), or None for the language model."""
    m = CONTEXT_RE.search(prefix)
    return CONTEXT_KINDS[m.lastgroup] if m is not None and m.lastgroup else None


@lru_cache(maxsize=65536)
def _layer_template(prefix: str, tail_name: str) -> tuple[Kind | None, _TailMatch | None]:
    """(kind forced by the prefix, table row of the tail) of a module in a decoder layer; one cache
    lookup per module (45k in DeepSeek-V3) for what only depends on its layer-less name."""
    return (_context(prefix) if prefix else None), _match_tail(tail_name)


@lru_cache(maxsize=1024)
def _fused_tensor_suffix(last: str) -> tuple[str, str] | None:
    """`gate_up_proj_weight_scale` -> ("gate_up_proj", "weight_scale"); bare `down_proj` -> weight."""
    m = FUSED_TENSOR_RE.fullmatch(last)
    if m is None:
        return None
    rest = m.group("rest")
    if rest is None:
        return m.group("proj"), "weight"
    for candidate in (rest, f"weight_{rest}"):  # LLM Compressor wrote `gate_up_proj_packed` / `_scale`
        if candidate in _MODULE_SUFFIXES:
            return m.group("proj"), candidate
    return None


def _group_tensors(tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, dict[str, TensorInfo]], list[str]]:
    """module name -> {suffix: tensor}; names that cannot belong to a module are returned apart.

    Hot loop (180k tensors): a module's tensors are usually adjacent in header order, so the last
    module's dict is reused without a lookup.
    """
    groups: dict[str, dict[str, TensorInfo]] = {}
    loose: list[str] = []
    suffixes = _MODULE_SUFFIXES
    last_module, current = "", {}
    for name, info in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix not in suffixes:
            split = _fused_tensor_suffix(suffix) if module.endswith("experts") else None
            if split is None:
                loose.append(name)
                continue
            module, suffix = f"{module}.{split[0]}", split[1]
        if module != last_module:
            if not module:
                loose.append(name)
                continue
            current = groups.get(module)  # type: ignore[assignment]
            if current is None:
                current = groups[module] = {}
            last_module = module
        current[suffix] = info
    return groups, loose


def _logical_shape(tensors: Mapping[str, TensorInfo]) -> tuple[int | None, int | None]:
    """[out, in] of the unquantized module; packed weights are unpacked via the scheme table.

    2-D weights give [out, in * pack] (U8 NVFP4 [out, in/2] -> in); 1-D (norms) [n, None]; more
    dims (conv1d [C, 1, K]) fold the trailing dims into in.
    """
    suffix = "weight"
    weight = tensors.get("weight")
    if weight is None:
        suffix = "weight_packed"
        weight = tensors.get(suffix)
        if weight is None:
            return _scheme_logical_shape(tensors)
    shape = weight.shape
    if len(shape) == 2:
        return shape[0], shape[1] * _IN_PACK.get((suffix, weight.dtype), 1)
    if len(shape) < 2:
        return (shape[0], None) if shape else (None, None)
    in_features = 1
    for d in shape[1:]:
        in_features *= d
    return shape[0], in_features


def _looks_transposed(proj: str, d1: int, d2: int, hidden: int | None) -> bool:
    """Without a table entry: [E, H, 2I] / [E, I, H] are transposed when the hidden dim says so."""
    if hidden is None:
        return False
    if proj == "down_proj":
        return d2 == hidden and d1 != hidden  # [E, I, H]
    return d1 == hidden and d2 != hidden  # [E, H, 2I] / [E, H, I]


_FUSED_PARTS: dict[str, tuple[tuple[str, str, int | None], ...]] = {
    # fused tensor proj -> (virtual leaf name, role, which half of the out dim: 0 gate, 1 up, None all)
    "gate_up_proj": (("gate_proj", "gate", 0), ("up_proj", "up", 1)),
    "down_proj": (("down_proj", "down", None),),
    "up_proj": (("up_proj", "up", None),),
}


def _expand_fused(module: str, tensors: dict[str, TensorInfo], layer: int | None, experts: str,
                  cfg: _Config, fused: tuple[FusedWeight, TensorInfo]) -> list[Module]:
    """Virtual per-expert modules for one fused 3-D tensor `<experts>.<proj>` [E, ., .]."""
    proj = module[len(experts) + 1:]
    fw, weight = fused
    n_experts, d1, d2 = weight.shape[:3]
    fmt = cfg.fused_format
    interleaved = fmt.interleaved if fmt is not None else False
    if fw.scheme is not None:  # a quantized fused form: the scheme table knows the per-expert shape
        dialect, _, name = fw.scheme.partition(":")
        transposed = bool(fw.transposed)
        out, in_ = scheme(dialect, name).logical_from_weight(weight.shape[1:])
    else:
        transposed = fmt.transposed if fmt is not None else _looks_transposed(proj, d1, d2, cfg.hidden)
        pack = _IN_PACK.get(("weight", weight.dtype), 1)
        out, in_ = (d2, d1 * pack) if transposed else (d1, d2 * pack)   # packed along in: [E, in/2, out]
    half = out // 2
    result = []
    for e in range(n_experts):
        for leaf, role, part in _FUSED_PARTS[proj]:
            rows = None if part is None else (part * half, (part + 1) * half)
            group = f"{experts}.{e}.gate_up" if role in ("gate", "up") and part is not None else None
            result.append(_module(
                f"{experts}.{e}.{leaf}", Kind.EXPERT, layer, e, role, group, experts, tensors,
                FusedSlice(weight.name, e, rows, transposed, interleaved),
                half if rows is not None else out, in_))
    return result


def _is_norm(module: str, tensors: Mapping[str, TensorInfo]) -> bool:
    weight = tensors.get("weight")
    if weight is not None and len(weight.shape) > 1:
        return False
    return NORM_RE.fullmatch(module.rpartition(".")[2]) is not None


def _global_module(module: str, tensors: dict[str, TensorInfo]) -> Module:
    """A module outside the decoder layers: lm_head, embeddings, final norm, vision/projector parts."""
    out, in_ = _logical_shape(tensors)
    forced = _context(module)
    if forced is not None:
        return _module(module, forced, None, None, MTP_ROLE if forced is Kind.OTHER else None, None, None,
                      tensors, None, out, in_)
    last = module.rpartition(".")[2]
    for pattern, row in COMPILED_GLOBAL_ROWS:
        if pattern.fullmatch(last):
            return _module(module, row.kind, None, None, row.role, None, None, tensors, None, out, in_)
    kind = Kind.NORM if _is_norm(module, tensors) else Kind.OTHER
    return _module(module, kind, None, None, None, None, None, tensors, None, out, in_)


def _split_layer(module: str) -> tuple[str, int, str, str] | None:
    """`model.h.3.mlp.gate` -> ("model", 3, "model.h.3", "mlp.gate"); None outside layers. `_build`
    splits the common `<prefix>.layers.<N>.` spelling itself (45k modules in DeepSeek-V3)."""
    m = LAYER_RE.search(module)
    if m is None:
        return None
    return module[:m.start()], int(m.group(1)), module[:m.end() - 1], module[m.end():]


def _layer_module(module: str, parts: dict[str, TensorInfo], split: tuple[str, int, str, str],
                  cfg: _Config, virtual: list[Module]) -> Module | None:
    """Classify a module inside a decoder layer; fused 3-D experts go to `virtual` instead."""
    prefix, layer, base, tail_name = split
    forced, tail = _layer_template(prefix, tail_name)
    if forced is None and cfg.num_layers is not None and layer >= cfg.num_layers:
        forced = Kind.OTHER  # DeepSeek MTP: model.layers.{num_hidden_layers + k}
    if tail is not None and tail.fused_experts and forced is None:
        fused = _fused_weight(parts)
        if fused is not None:
            virtual.extend(_expand_fused(module, parts, layer, base + (tail.experts_rel or ""), cfg, fused))
            return None
    out, in_ = _logical_shape(parts)
    if forced is Kind.OTHER:  # MTP / draft layers: not part of the served model
        expert = tail.expert if tail else None
        return _module(module, forced, layer, expert, MTP_ROLE, None, None, parts, None, out, in_)
    if forced is not None:  # vision tower / projector: keep the role, drop LM layer numbering
        role, fused = (tail.role, tail.fused_rel) if tail else (None, None)
        return _module(module, forced, None, None, role, base + fused if fused else None, None, parts, None,
                       out, in_)
    if tail is not None and not tail.fused_experts:
        return _module(module, tail.kind, layer, tail.expert, tail.role,
                       base + tail.fused_rel if tail.fused_rel is not None else None,
                       base + tail.moe_rel if tail.moe_rel is not None else None, parts, None, out, in_)
    kind = Kind.NORM if _is_norm(module, parts) else Kind.OTHER
    return _module(module, kind, layer, None, None, None, None, parts, None, out, in_)


def build_layout(tensors: Mapping[str, TensorInfo], config: Mapping[str, Any] | None) -> Layout:
    """Lay out every module of a checkpoint from its tensor headers and config.json (may be None)."""
    with gc_paused():  # ~200k long-lived objects: cyclic GC passes would double the time, find nothing
        return _build(tensors, _Config(config))


def _build(tensors: Mapping[str, TensorInfo], cfg: _Config) -> Layout:
    groups, unassigned = _group_tensors(tensors)
    modules: dict[str, Module] = {}
    virtual: list[Module] = []
    markers = _MODULE_MARKERS
    num_layers = cfg.num_layers
    new, module_type, weight_pack = _new_tuple, Module, _WEIGHT_IN_PACK.get
    for module, parts in groups.items():
        if markers.isdisjoint(parts):  # only biases / KV scales: buffers, not a module
            unassigned.extend(info.name for info in parts.values())
            continue
        # Inlined `_split_layer` fast path and the common case of `_layer_module` (a table row
        # matched in an ordinary decoder layer): 45k modules in DeepSeek-V3, same result.
        prefix, marker, rest = module.partition(".layers.")
        digits, dot, tail_name = rest.partition(".")
        if dot and digits.isdigit() and digits.isascii():
            layer = int(digits)
            forced, tail = _layer_template(prefix, tail_name)
            base = f"{prefix}.layers.{digits}"
            if forced is None and tail is not None and not tail.fused_experts \
                    and (num_layers is None or layer < num_layers):
                weight = parts.get("weight")
                if weight is not None and len(weight.shape) == 2:  # _logical_shape's common case
                    out, in_ = weight.shape[0], weight.shape[1] * weight_pack(weight.dtype, 1)
                else:
                    out, in_ = _logical_shape(parts)
                modules[module] = new(module_type, (   # _module(...)
                    module, tail.kind, layer, tail.expert, tail.role,
                    base + tail.fused_rel if tail.fused_rel is not None else None,
                    base + tail.moe_rel if tail.moe_rel is not None else None, parts, None, out, in_))
                continue
            split: tuple[str, int, str, str] | None = (prefix, layer, base, tail_name)
        else:
            split = _split_layer(module)
        if split is None:
            modules[module] = _global_module(module, parts)
            continue
        mod = _layer_module(module, parts, split, cfg, virtual)
        if mod is not None:
            modules[module] = mod
    for vm in virtual:
        modules.setdefault(vm.name, vm)  # a real per-expert module of the same name wins
    num_layers = cfg.num_layers
    if num_layers is None:
        layers = [mod.layer for mod in modules.values() if mod.layer is not None and mod.role != MTP_ROLE]
        num_layers = max(layers) + 1 if layers else None
    names = sorted(modules)  # plain str keys sort faster than (name, module) items; same order
    return Layout(cfg.architecture, dict(zip(names, map(modules.__getitem__, names))), num_layers,
                  cfg.num_experts, sorted(unassigned))
