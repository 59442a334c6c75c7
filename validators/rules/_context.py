"""Derived facts the rules share, computed once per validation and cached.

* `state(module)`: what the bytes say (quantized with which scheme, BF16, or other).
* `coverage(engine)`: what the engine will build for each module (its prefix, the engine layer
  that owns it, excluded or not and by which pattern and test, forced unquantized, shard conflicts).
* `declared(module)`: which scheme the config promises for a module the engine quantizes.

Exclusion is evaluated per engine *layer* (a FusedMoE layer, a fused qkv/gate_up linear), exactly
as the engines do, so 47k expert modules cost 61 matches, not 47k x patterns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from typing import TYPE_CHECKING

from quantgate.validators import engine_facts
from quantgate.validators.engines import (
    ENGINE_SEMANTICS,
    ArchNaming,
    ExclusionHit,
    FusedShardConflict,
    ct_is_ignored,
    ct_match,
    engine_unit,
    is_vision,
    map_prefixes,
    naming_for,
)
from quantgate.validators.format_support import is_modelled
from quantgate.validators.layout_table import MTP_ROLE
from quantgate.validators.quant_config import COMPRESSED_TENSORS, MODELOPT
from quantgate.validators.schemes import FP8_NATIVE

if TYPE_CHECKING:
    from quantgate.validators.layout import Module
    from quantgate.validators.rules import Context
    from quantgate.validators.schemes import SchemeSpec

log = logging.getLogger(__name__)

QUANTIZED, BF16, OTHER = "quantized", "bf16", "other"
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})
WEIGHT_KEYS: tuple[str, ...] = ("weight", "weight_packed", "qweight", "blocks")
#: engines that force vision towers unquantized whatever the exclude list says (invariant 12)
FORCES_VISION_UNQUANTIZED = frozenset({"vllm"})
#: modules that never carry quantization in any dialect (weights are vectors or lookup tables)
NEVER_QUANTIZED_KINDS = frozenset({"norm", "embedding"})
#: per dialect, kinds the engine never quantizes: native fp8 quantizes LinearBase and FusedMoE only, and
#: ParallelLMHead is neither (vLLM/SGLang `Fp8Config.get_quant_method`)
DIALECT_UNQUANTIZED_KINDS: dict[str, frozenset[str]] = {FP8_NATIVE: frozenset({"lm_head"})}
#: roles every engine builds with `quant_config=None`, whatever the architecture: the gated-delta /
#: Mamba `conv1d` (vLLM qwen3_next.py, mamba_mixer2.py: ColumnParallelLinear without a quant config;
#: SGLang passes quant_config=None). Producers never list it (it is an nn.Conv1d in transformers).
NEVER_QUANTIZED_ROLES = frozenset({"conv"})
KV_SCALE_SUFFIXES: tuple[str, ...] = ("k_scale", "v_scale")
KV_SCALE_TAILS: tuple[str, ...] = (".k_scale", ".v_scale")
_DTYPE_SHAPE = attrgetter("dtype", "shape")


@dataclass(frozen=True, slots=True)
class ModState:
    state: str                          # QUANTIZED | BF16 | OTHER
    scheme: "SchemeSpec | None"         # matched from the tensor set (None when BF16 or unknown)
    weight_dtype: str | None
    scale_suffixes: tuple[str, ...]     # every suffix except the weight (and bias)


@dataclass(frozen=True, slots=True)
class Cov:
    """One module class as an engine sees it."""

    engine_name: str                    # of the class's representative module
    unit: str                           # the engine layer (FusedMoE prefix, fused linear, or itself)
    excluded: bool                      # the engine builds it unquantized
    hit: ExclusionHit | None            # the pattern and test that excluded it
    forced: str | None                  # "vision" | "unquantized_role" | "spec_layer_skipped" | "never_quantized"
                                        # | "not_listed" | ...
    conflict: FusedShardConflict | None


@dataclass(eq=False)
class ModClass:
    """Modules that are interchangeable for every rule: same kind, role, MoE layer (or the module
    itself when it is not a routed expert) and the same tensor suffixes, dtypes and shapes. The 46k
    expert modules of DeepSeek-V3 form ~200 classes, so rules cost per class, not per module."""

    kind: str
    role: str | None
    moe_group: str | None
    members: list["Module"]
    state: ModState

    @property
    def rep(self) -> "Module":
        return self.members[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]


def per_expert(module: "Module") -> dict:
    """A module's tensors as one expert sees them: fused 3-D (4-D MXFP4) expert tensors lose their
    leading expert dim, so the scheme table's per-module shapes apply."""
    if module.fused is None:
        return module.tensors
    return {s: t._replace(shape=t.shape[1:]) for s, t in module.tensors.items() if t.shape}


def kind_of(module: "Module") -> str:
    kind = module.kind
    return getattr(kind, "value", str(kind))


class Analysis:
    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.layout = ctx.layout
        self.qc = ctx.qc
        self.architecture = ctx.layout.architecture
        self.naming: ArchNaming = naming_for(self.architecture)
        self._scheme_cache: dict[tuple, "SchemeSpec | None"] = {}
        self._coverage: dict[str, list[Cov]] = {}
        self.classes: list[ModClass] = self._build_classes()
        self._class_index: dict[str, int] | None = None

    # ---- bytes ---------------------------------------------------------------------------------
    def _build_classes(self) -> list[ModClass]:
        by_key: dict[tuple, ModClass] = {}
        for m in self.layout.modules.values():
            # the tensor signature: suffixes in order, then (dtype, shape) in the same order
            key = (m.moe_group or m.name, m.role, m.kind, m.fused is not None, tuple(m.tensors),
                   tuple(map(_DTYPE_SHAPE, m.tensors.values())))
            cls = by_key.get(key)
            if cls is None:
                by_key[key] = ModClass(kind_of(m), m.role, m.moe_group, [m], self._classify(m))
            else:
                cls.members.append(m)
        return list(by_key.values())

    @cached_property
    def dialect(self) -> str:
        """The config's dialect, or the one the tensor names suggest when there is no config."""
        from quantgate.validators.schemes import GPTQ, match_scheme

        if self.qc is not None:     # a dialect not modelled runs only format-independent rules (QG190)
            return self.qc.dialect
        for m in self.layout.modules.values():
            if "weight_packed" in m.tensors:
                return COMPRESSED_TENSORS
            if "qweight" in m.tensors or "blocks" in m.tensors:   # GPTQ / AWQ / MXFP4: the bytes say which
                spec = match_scheme(None, per_expert(m))
                return spec.dialect if spec is not None else GPTQ
        return MODELOPT

    def _match(self, module: "Module") -> "SchemeSpec | None":
        from quantgate.validators.fused_schemes import fused_storage
        from quantgate.validators.schemes import match_scheme

        transposed = module.fused.transposed if module.fused is not None else None
        sig = (transposed, *sorted((s, t.dtype, t.shape) for s, t in module.tensors.items()))
        if sig not in self._scheme_cache:
            try:
                stored = fused_storage(self.dialect, module.tensors, transposed) \
                    if transposed is not None else None
                # fused 3-D forms (ModelOpt's [E, in, out] experts) first; otherwise the per-expert view
                # (MXFP4 blocks lose their leading expert dim), matched against the per-module table
                self._scheme_cache[sig] = stored[0] if stored is not None \
                    else match_scheme(self.dialect, per_expert(module))
            except Exception:   # noqa: BLE001 - an odd tensor set is a finding, never a crash
                log.debug("match_scheme failed for %s", module.name, exc_info=True)
                self._scheme_cache[sig] = None
        return self._scheme_cache[sig]

    def class_of(self, name: str) -> ModClass:
        if self._class_index is None:
            self._class_index = {m.name: i for i, c in enumerate(self.classes) for m in c.members}
        return self.classes[self._class_index[name]]

    def state(self, module: "Module") -> ModState:
        return self.class_of(module.name).state

    def _classify(self, module: "Module") -> ModState:
        weight = next((module.tensors[k] for k in WEIGHT_KEYS if k in module.tensors), None)
        scales = tuple(sorted(s for s in module.tensors if s not in WEIGHT_KEYS and s != "bias"))
        wdtype = weight.dtype if weight is not None else None
        if not scales and wdtype in FLOAT_DTYPES:
            return ModState(BF16, None, wdtype, ())
        if scales or (wdtype is not None and wdtype not in FLOAT_DTYPES):
            return ModState(QUANTIZED, self._match(module), wdtype, scales)
        return ModState(OTHER, None, wdtype, scales)

    @cached_property
    def quantized_classes(self) -> list[ModClass]:
        return [c for c in self.classes if c.state.state == QUANTIZED]

    @cached_property
    def quantized_count(self) -> int:
        return sum(len(c.members) for c in self.quantized_classes)

    @cached_property
    def is_quantized(self) -> bool:
        return bool(self.quantized_classes)

    @cached_property
    def kv_scale_names(self) -> list[str]:
        """KV-cache scale tensors: on attention projections (ModelOpt) or outside any module (CT)."""
        names = [n for n in self.layout.unassigned if n.endswith(KV_SCALE_TAILS)]
        for cls in self.classes:
            if cls.kind == "attention":
                for suffix in KV_SCALE_SUFFIXES:
                    if suffix in cls.rep.tensors:
                        names.extend(m.tensors[suffix].name for m in cls.members)
        return names

    def of_kind(self, *kinds: str) -> list[ModClass]:
        return [c for c in self.classes if c.kind in kinds]

    # ---- config --------------------------------------------------------------------------------
    @cached_property
    def active(self) -> bool:
        """Coverage rules (QG2xx over exclusion lists) apply: the config is modelled and its dialect
        excludes through a list matched here (modelopt, compressed-tensors, fp8). gptq / awq / mxfp4
        decide per layer in their own rules (rules/_wna16.py, rules/mxfp4.py)."""
        from quantgate.validators.dialects import BEYOND_DIALECTS

        return self.qc is not None and is_modelled(self.qc) and self.qc.dialect not in BEYOND_DIALECTS

    def mixed_algo(self, module: "Module", engine_name: str) -> str | None:
        """MIXED_PRECISION: the algo `quantized_layers` gives this module (vLLM `_resolve_quant_algo`)."""
        layers = (self.qc.quantized_layers or {}) if self.qc else {}
        unit = engine_unit(engine_name, self.naming)
        candidates = [module.name, engine_name, unit]
        if module.fused_group:
            candidates.append(module.fused_group)
        for name in candidates:
            if name in layers:
                return layers[name].get("quant_algo")
        for name in (unit, module.moe_group or ""):
            if not name:
                continue
            for key, spec in layers.items():
                if key.startswith(name + "."):
                    return spec.get("quant_algo")
        return None

    def declared_algo(self, module: "Module", engine_name: str) -> str | None:
        if self.qc is None or not self.qc.is_modelopt:
            return None
        if self.qc.quant_algo == "MIXED_PRECISION":
            return self.mixed_algo(module, engine_name)
        return self.qc.quant_algo

    def ct_group(self, module: "Module", engine_name: str) -> dict | None:
        """The compressed-tensors config group whose targets match the module (name, regex, `Linear`)."""
        groups = (self.qc.config_groups or {}) if self.qc else {}
        # vLLM's find_matched_target: a name / regex target wins over the class target `Linear`
        for group in groups.values():
            if any(ct_match(engine_name, t) or ct_match(module.name, t) for t in group.get("targets") or []):
                return group
        for group in groups.values():
            if "Linear" in (group.get("targets") or []):
                return group
        return None

    def declared(self, module: "Module", engine_name: str) -> "list[SchemeSpec]":
        """Schemes the config allows for this module when the engine quantizes it."""
        from quantgate.validators.schemes import SCHEMES

        if self.qc is None:
            return []
        if self.qc.is_modelopt:
            algo = self.declared_algo(module, engine_name)
            return [s for s in SCHEMES if s.dialect == MODELOPT and algo and s.quant_algo == algo]
        if self.qc.is_ct:
            group = self.ct_group(module, engine_name)
            if group is None:
                return []
            from quantgate.validators.schemes import ct_group_schemes

            return ct_group_schemes(group, self.qc.ct_format)
        from quantgate.validators.dialects import declared_schemes

        return declared_schemes(self.qc, module, engine_name)

    # ---- engines -------------------------------------------------------------------------------
    def coverage(self, engine: str) -> list[Cov]:
        """Cov per class (same order as `classes`)."""
        cov = self._coverage.get(engine)
        if cov is None:
            cov = self._coverage[engine] = self._compute_coverage(engine)
        return cov

    def cov(self, engine: str, cls: ModClass) -> Cov:
        return self.coverage(engine)[self._position[id(cls)]]

    @cached_property
    def _position(self) -> dict[int, int]:
        return {id(c): i for i, c in enumerate(self.classes)}

    def _compute_coverage(self, engine: str) -> list[Cov]:
        sem = ENGINE_SEMANTICS[engine]
        arch = self.architecture
        patterns = sem.engine_patterns(self.qc.exclude if self.qc else [], arch)
        internal = self.internal_renames(engine)
        per_unit: dict[str, tuple[ExclusionHit | None, FusedShardConflict | None]] = {}
        out: list[Cov] = []
        for cls in self.classes:
            module = cls.rep
            ename = sem.engine_name(module.name, arch, internal)
            unit = sem.engine_name(cls.moe_group, arch, internal) if cls.kind == "expert" and cls.moe_group \
                else engine_unit(ename, self.naming)
            if unit not in per_unit:
                per_unit[unit] = self._unit_exclusion(sem, unit, patterns)
            hit, conflict = per_unit[unit]
            forced = self._forced(engine, module, unit, ename)
            out.append(Cov(ename, unit, bool(hit) or forced is not None, hit, forced, conflict))
        return out

    def fp8_listed(self, engine: str) -> tuple[str, ...]:
        """The fp8 exclusion list (`ignored_layers`, else `modules_to_not_convert`) in `engine`'s name space."""
        cache = self.__dict__.setdefault("_fp8_listed", {})
        if engine not in cache:
            from quantgate.validators.fp8_engines import fp8_patterns

            cache[engine] = fp8_patterns(engine, self.qc.params.exclusions, self.naming)
        return cache[engine]

    def engine_version(self, engine: str) -> str | None:
        """The engine release the verdicts are for (`Context.engine_versions`, e.g. from
        `--engine-version sglang=0.5.10`); None: the newest semantics modelled."""
        return self.ctx.engine_versions.get(engine)

    @cached_property
    def ct_ignore(self) -> tuple[str, ...]:
        """CT `ignore` in the engine's name space: vLLM maps the list with the model's hf_to_vllm_mapper
        (`CompressedTensorsConfig.apply_vllm_mapper`), as it maps the module names; without it a
        multimodal wrapper's `model.language_model.*` entries would match nothing."""
        return map_prefixes(self.qc.exclude, self.naming) if self.qc is not None else ()

    def _unit_exclusion(self, sem, unit: str, patterns: tuple[str, ...]
                        ) -> tuple[ExclusionHit | None, FusedShardConflict | None]:
        try:
            if self.qc is not None and self.qc.dialect == FP8_NATIVE:
                from quantgate.validators.fp8_engines import fp8_exclusion

                return fp8_exclusion(sem.name, unit, self.fp8_listed(sem.name), self.naming,
                                     self.engine_version(sem.name)), None
            if self.qc is not None and self.qc.is_ct:
                probe = f"{unit}.0.gate_proj" if unit.endswith("experts") else unit
                ignored = ct_is_ignored(probe, self.ct_ignore, self.naming)
                return (ExclusionHit("ignore", "exact") if ignored else None), None
            return sem.match(unit, patterns, self.architecture), None
        except FusedShardConflict as conflict:
            return None, conflict

    def _forced(self, engine: str, module: "Module", unit: str, ename: str) -> str | None:
        if engine in FORCES_VISION_UNQUANTIZED and self.dialect == MODELOPT and is_vision(unit):
            return "vision"
        if module.role in self.unquantized_roles(engine):
            return "unquantized_role"
        if module.role == MTP_ROLE and self.skips_spec_layers(engine):
            return "spec_layer_skipped"
        if kind_of(module) in NEVER_QUANTIZED_KINDS or module.role in NEVER_QUANTIZED_ROLES or \
                kind_of(module) in DIALECT_UNQUANTIZED_KINDS.get(self.dialect, ()):
            return "never_quantized"
        if self.qc is not None and self.qc.is_modelopt and self.qc.quant_algo == "MIXED_PRECISION":
            if self.mixed_algo(module, ename) is None:
                return "not_listed"
        if self.qc is not None and self.qc.is_ct and self.ct_group(module, ename) is None:
            return "not_targeted"
        return None

    # ---- engine facts (validators/engine_facts.py), at the requested engine release ----------------
    def engine_fact(self, engine: str, key: str, default=None):
        return engine_facts.fact(engine, key, self.architecture, self.ctx.engine_versions.get(engine), default)

    def unquantized_roles(self, engine: str) -> frozenset[str]:
        """Roles the engine's model builds without a quant config (routers, shared-expert gates)."""
        return self.engine_fact(engine, engine_facts.UNQUANTIZED_ROLES, frozenset())

    def internal_renames(self, engine: str) -> tuple[tuple[str, str], ...] | None:
        """The model loader's own renames at this release (None: engines.ARCH_NAMING's)."""
        return self.engine_fact(engine, engine_facts.INTERNAL_RENAMES, None)

    def skips_spec_layers(self, engine: str) -> bool:
        """The main model drops MTP / nextn layers (loaded only by a speculative-decoding draft)."""
        return bool(self.engine_fact(engine, engine_facts.SKIPS_SPEC_LAYERS, False))

    def engine_units(self, engine: str) -> set[str]:
        """Every engine layer name, plus the tied `lm_head` every causal LM has in the engine."""
        units = {c.unit for c in self.coverage(engine)}
        units.add(ENGINE_SEMANTICS[engine].engine_name("lm_head", self.architecture, self.internal_renames(engine)))
        return units

    def stale_patterns(self, engine: str) -> list[str]:
        """Exclude entries that exclude no engine layer at all under this engine's matching."""
        if self.qc is not None and self.qc.dialect == FP8_NATIVE:
            from quantgate.validators.fp8_engines import fp8_stale_entries

            return fp8_stale_entries(engine, self.qc.params.exclusions, self.engine_units(engine),
                                     self.naming, self.engine_version(engine))
        if self.qc is None or not self.qc.is_modelopt:
            return []
        sem = ENGINE_SEMANTICS[engine]
        units = sorted(self.engine_units(engine))
        stale: list[str] = []
        for pattern in dict.fromkeys(self.qc.exclude):
            mapped = sem.engine_patterns([pattern], self.architecture)
            if not any(self._safe_match(sem, u, mapped) for u in units):
                stale.append(pattern)
        return stale

    def _safe_match(self, sem, unit: str, patterns: tuple[str, ...]) -> bool:
        try:
            return sem.match(unit, patterns, self.architecture) is not None
        except FusedShardConflict:   # listing one shard does something (QG207 reports it)
            return True
