"""Recipes (named like ModelOpt's configs) and the plan they make for one layout.

A recipe is data: a scheme for the quantized kinds, nothing else. Kinds never listed in any recipe
(lm_head, embedding, router, vision, projector, norm, other) always stay BF16 and are excluded.
The plan then applies, in order: the recipe's kinds, user `--exclude` patterns (fnmatch on HF
module names), the scheme's shape limits (NVFP4 needs in_features % 16 == 0), and the
all-or-nothing rule for groups the engines fuse (q/k/v, gate/up, one expert's gate/up) and for the
experts of one MoE layer (vLLM builds one FusedMoE per layer: one format for all of them).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from quantgate.exporter.auto.options import AUTO_DIALECT, AUTO_RECIPE
from quantgate.exporter.schemes import DECODER_LINEAR_KINDS, SCHEMES, get_scheme
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Kind, Layout, Module
from quantgate.validators.engines import ArchNaming, naming_for, packed_name
from quantgate.validators.fp8_engines import block_split_error
from quantgate.validators.schemes import CT_FLOAT_STRATEGY, COMPRESSED_TENSORS, MODELOPT, MXFP4, SchemeSpec, scheme

log = logging.getLogger(__name__)

DIALECT = "modelopt"


@dataclass(frozen=True)
class Recipe:
    """A named policy: modules of `kinds` get `scheme_name`; everything else stays BF16."""

    name: str
    scheme_name: str            # the registry scheme (its spec name in the default dialect)
    kinds: frozenset[Kind]
    description: str
    dialects: tuple[str, ...] = (MODELOPT, COMPRESSED_TENSORS)   # the first is the default


#: Every recipe, from the scheme registry (`quantgate.exporter.schemes`): a recipe is a scheme's entry
#: there, written in the scheme's dialects (its first the default).
RECIPES: dict[str, Recipe] = {
    r.name: Recipe(r.name, s.spec_name(s.dialects[0]), r.kinds, r.description, dialects=s.dialects)
    for s in SCHEMES for r in s.recipes}

#: Dialects that can hold only some kinds (the engines build the rest unquantized) -> (kinds, why).
DIALECT_KINDS: dict[str, tuple[frozenset[Kind], str]] = {
    MXFP4: (frozenset({Kind.EXPERT}), "the mxfp4 dialect quantizes routed experts only (vLLM and SGLang build every "
                                      "Linear BF16 under mxfp4)"),
}

#: Why a kind that no recipe quantizes stays BF16 (becomes the Assignment's reason).
ALWAYS_EXCLUDED_REASON: dict[Kind, str] = {
    Kind.LM_HEAD: "lm_head stays BF16",
    Kind.EMBEDDING: "embeddings stay BF16",
    Kind.ROUTER: "routers and gates stay BF16 (engines build them unquantized)",
    Kind.VISION: "vision/audio towers stay BF16",
    Kind.PROJECTOR: "multimodal projectors stay BF16",
    Kind.NORM: "norms are not Linear layers",
    Kind.OTHER: "not a decoder Linear the recipe covers (MTP, conv, unknown)",
}


@dataclass
class Assignment:
    """What the plan does with one module: `scheme` None means left BF16 for `reason`."""

    module: str
    scheme: SchemeSpec | None
    reason: str | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme is not None


@dataclass
class Plan:
    recipe: str
    assignments: dict[str, Assignment]
    warnings: list[str] = field(default_factory=list)
    needs_calibration: bool = False

    def quantized(self) -> list[str]:
        return [name for name, a in self.assignments.items() if a.quantized]

    def excluded(self) -> list[str]:
        return [name for name, a in self.assignments.items() if not a.quantized]

    @property
    def scheme(self) -> SchemeSpec | None:
        """The single scheme of a uniform plan (None when nothing is quantized)."""
        schemes = {a.scheme.name: a.scheme for a in self.assignments.values() if a.scheme is not None}
        if len(schemes) > 1:
            raise UsageError(f"plan mixes schemes {sorted(schemes)}; the modelopt writer needs one")
        return next(iter(schemes.values()), None)


def recipe_names() -> tuple[str, ...]:
    """Every recipe a user can ask for: the table's, then `auto` (per-layer formats, exporter.auto)."""
    return (*RECIPES, AUTO_RECIPE)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown recipe {name!r}; choose one of: {', '.join(recipe_names())}") from None


#: Every dialect some recipe can be written in, in first-use order (CLI choices, API schema, checks).
WRITABLE_DIALECTS: tuple[str, ...] = tuple(dict.fromkeys(d for r in RECIPES.values() for d in r.dialects))


def default_dialects_text() -> str:
    """Each dialect with the recipes it is the default of, for help texts: "modelopt for nvfp4, ..., auto;
    compressed-tensors for w4a16, ...; fp8 for fp8_block"."""
    by_dialect: dict[str, list[str]] = {}
    for name in recipe_names():
        by_dialect.setdefault(default_dialect(name), []).append(name)
    return "; ".join(f"{d} for {', '.join(names)}" for d, names in by_dialect.items())


def default_dialect(recipe: str) -> str:
    """The dialect a recipe is written in when the user names none (`auto`: ModelOpt mixed precision)."""
    return AUTO_DIALECT if recipe == AUTO_RECIPE else get_recipe(recipe).dialects[0]


def resolve_dialect(recipe: str, dialect: str | None) -> str | None:
    """The one place a missing dialect is decided: `dialect` when given, else the recipe's default;
    None for an unknown recipe (reported, with the list of recipes, when the request is checked)."""
    if dialect:
        return dialect
    return default_dialect(recipe) if recipe in RECIPES or recipe == AUTO_RECIPE else None


#: How the dialect option is spelled to the user: the command-line flag, or the job-body field (API).
CLI_DIALECT = "--dialect {}"
API_DIALECT = '"dialect": "{}"'


def check_dialect(recipe: str, dialect: str, spelling: str = CLI_DIALECT) -> None:
    """UsageError when `recipe` cannot be written in `dialect` (e.g. w4a16 has no ModelOpt spelling)."""
    rec = get_recipe(recipe)
    if dialect not in rec.dialects:
        raise UsageError(f"recipe {rec.name} cannot be written in the {dialect} dialect (its scheme "
                         f"{rec.scheme_name} exists only as {' / '.join(rec.dialects)}); "
                         f"write it as {rec.dialects[0]} ({spelling.format(rec.dialects[0])})")


def make_plan(layout: Layout, recipe: str, exclude: Sequence[str] = (), dialect: str = DIALECT) -> Plan:
    """Assign a scheme or an exclusion reason to every weight-bearing module of `layout`."""
    rec = get_recipe(recipe)
    check_dialect(recipe, dialect)
    entry = get_scheme(rec.scheme_name)
    spec = scheme(dialect, entry.spec_name(dialect))
    plan = Plan(recipe=rec.name, assignments={})
    naming = naming_for(layout.architecture)
    for name, module in sorted(layout.modules.items()):
        plan.assignments[name] = _assign(module, rec, spec, exclude, plan.warnings, naming)
    _propagate_groups(layout, plan)
    plan.needs_calibration = entry.calibrates and any(a.quantized for a in plan.assignments.values())
    if not any(a.quantized for a in plan.assignments.values()):
        plan.warnings.append(f"recipe {rec.name} quantizes no module of this model")
    for warning in plan.warnings:   # data for the caller to show once (CLI `warning:` lines, job events)
        log.debug("%s", warning)
    return plan


def _assign(module: Module, rec: Recipe, spec: SchemeSpec, exclude: Sequence[str],
            warnings: list[str], naming: ArchNaming) -> Assignment:
    if module.kind not in DECODER_LINEAR_KINDS:
        return Assignment(module.name, None, ALWAYS_EXCLUDED_REASON.get(module.kind, f"kind {module.kind.value}"))
    if module.kind not in rec.kinds:
        return Assignment(module.name, None, f"recipe {rec.name} leaves {module.kind.value} modules BF16")
    if spec.dialect in DIALECT_KINDS and module.kind not in DIALECT_KINDS[spec.dialect][0]:
        return Assignment(module.name, None, DIALECT_KINDS[spec.dialect][1])
    weight = module.tensors.get("weight")
    if module.fused is None and (weight is None or len(weight.shape) != 2):
        shape = list(weight.shape) if weight is not None else "none"
        return Assignment(module.name, None, f"not a Linear (weight shape {shape})")
    hit = next((p for p in exclude if fnmatch.fnmatchcase(module.name, p)), None)
    if hit is not None:
        return Assignment(module.name, None, f"excluded by --exclude {hit}")
    problem = _shape_problem(module, spec) or _engine_block_problem(module, spec, naming)
    if problem is not None:
        warnings.append(f"{module.name}: {problem}; left BF16 and excluded")
        return Assignment(module.name, None, problem)
    return Assignment(module.name, spec)


def _shape_problem(module: Module, spec: SchemeSpec) -> str | None:
    out_f, in_f = module.out_features, module.in_features
    if out_f is None or in_f is None:
        return "shape unknown"
    if in_f % spec.in_divisor:
        return f"in_features {in_f} is not divisible by {spec.in_divisor} ({spec.name})"
    if out_f % spec.out_divisor:
        return f"out_features {out_f} is not divisible by {spec.out_divisor} ({spec.name})"
    if spec.weight_block and (out_f % spec.weight_block[0] or in_f % spec.weight_block[1]):
        # transformers' FineGrainedFP8 quantizer (Fp8Quantize) leaves such weights unquantized
        return (f"weight [{out_f}, {in_f}] does not split into whole {spec.weight_block[0]}x"
                f"{spec.weight_block[1]} blocks ({spec.name})")
    return None


def _engine_block_problem(module: Module, spec: SchemeSpec, naming: ArchNaming) -> str | None:
    """A compressed-tensors FP8_BLOCK module whose rows the engines must split at a fused partition
    that is not a whole number of blocks (the validator's QG320, applied before anything is written).

    llm-compressor pads such a module's last block and writes it; vLLM and SGLang then refuse the
    checkpoint at load ("Weight output_partition_size = 64 is not divisible by weight quantization
    block_n = 128" for a merged qkv / gate_up shard other than the last; "The output_size of gate's
    and up's weight ..." for MoE experts). Leaving it BF16 (with its fused group, all-or-nothing)
    gives an export that loads. Native fp8 leaves every ragged module BF16 already (`_shape_problem`).
    """
    if not (spec.name == CT_FLOAT_STRATEGY["block"] and spec.ct_format and spec.group_size):
        return None
    block, out_f = spec.group_size, module.out_features
    if module.fused is not None or out_f is None:
        return None
    if block_split_error(module.name, module.kind, module.role, out_f, block, naming) is None:
        return None
    if module.kind is Kind.EXPERT:
        return (f"{out_f} rows of a MoE gate/up do not split into whole {block}-row blocks "
                "(the engines' fp8 MoE refuses them)")
    packed = packed_name(module.name, naming)
    merged = packed[0].rpartition(".")[2] if packed is not None else "linear"
    return (f"{out_f} rows of a shard of the engines' merged {merged} do not split "
            f"into whole {block}-row blocks (the engines refuse it at load)")


def _propagate_groups(layout: Layout, plan: Plan) -> None:
    """All-or-nothing for fused groups and for the experts of one MoE layer, to a fixed point."""
    groups: dict[str, list[str]] = {}
    for module in layout.modules.values():
        for key in (module.fused_group, module.moe_group):
            if key:
                groups.setdefault(key, []).append(module.name)
    changed = True
    while changed:
        changed = False
        for key, members in sorted(groups.items()):
            out = [m for m in members if not plan.assignments[m].quantized]
            if not out or len(out) == len(members):
                continue
            cause = out[0]
            for m in members:
                if plan.assignments[m].quantized:
                    plan.assignments[m] = Assignment(m, None, f"{key} is all-or-nothing and {cause} is BF16 "
                                                              f"({plan.assignments[cause].reason})")
                    changed = True
            plan.warnings.append(f"{key}: {len(members) - len(out)} module(s) left BF16 because {cause} is "
                                 f"BF16 ({plan.assignments[cause].reason}) and {key} is all-or-nothing")
