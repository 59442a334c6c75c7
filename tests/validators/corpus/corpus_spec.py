"""The case format of the bug-report corpus (the cases are in corpus_cases.py): `Case` and mutations.

Each `Case` is data: an architecture template (corpus_archs.ARCHS), the format each module kind is
stored in (corpus_formats.FORMATS), the producer's quantization config, optional mutations, and the
verdict per engine as the thread reports it (an engine missing from `expect` is not asserted: the
thread says nothing about it).
`cli` holds extra `quantgate validate` flags (engine version, deployment shape): such cases run
through the CLI subprocess.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import corpus_formats as qf
from corpus_archs import ARCHS
from corpus_build import Model, Spec

Mutation = Callable[[dict[str, Spec], dict, dict], None]
LOADS, FAILS, WRONG, UNKNOWN = "loads", "fails", "loads_wrong", "unknown"


@dataclass(frozen=True)
class Case:
    id: str
    title: str
    thread: str  # "owner/repo#N" (issue or PR)
    did: str  # one line: what the engine did with the real checkpoint
    arch: str
    quant: dict[str, str]  # module kind -> format (absent kinds stay BF16)
    qconfig: Callable[[Model], dict] | None
    expect: dict[str, str]  # engine -> loads | fails | loads_wrong | unknown
    mutate: tuple[Mutation, ...] = ()
    arch_kwargs: dict = field(default_factory=dict)
    published: str | None = None  # the released checkpoint this rebuilds (healthy exports)
    cli: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()  # finding codes the report must contain
    shards: int = 1
    index_extra: dict[str, str] = field(default_factory=dict)

    def model(self) -> Model:
        return ARCHS[self.arch](**self.arch_kwargs)


# ---- mutations ------------------------------------------------------------------------------------
def _select(tensors: dict, pattern: str, count: int | None) -> list[str]:
    names = sorted(n for n in tensors if re.search(pattern, n))
    assert names, f"no tensor matches {pattern!r}"
    return names if count is None else names[:count]


def drop(pattern: str, count: int | None = None) -> Mutation:
    def mutate(tensors: dict, config: dict, files: dict) -> None:
        for name in _select(tensors, pattern, count):
            del tensors[name]

    return mutate


def fill(pattern: str, value: float, count: int | None = None) -> Mutation:
    def mutate(tensors: dict, config: dict, files: dict) -> None:
        for name in _select(tensors, pattern, count):
            dtype, shape, _ = tensors[name]
            tensors[name] = (dtype, shape, value)

    return mutate


def rename(old: str, new: str) -> Mutation:
    """Regex-substitute tensor names (e.g. a doubled wrapper prefix, a swapped expert index)."""

    def mutate(tensors: dict, config: dict, files: dict) -> None:
        for name in [n for n in tensors if re.search(old, n)]:
            tensors[re.sub(old, new, name)] = tensors.pop(name)

    return mutate


def store_as(pattern: str, fmt: str) -> Mutation:
    """Re-store the linears whose `<module>.` matches `pattern` in another format (e.g. BF16 experts)."""

    def mutate(tensors: dict, config: dict, files: dict) -> None:
        modules = {}
        for name in [n for n in tensors if re.search(pattern, n)]:
            module, _, suffix = name.rpartition(".")
            if suffix in ("weight", "weight_packed", "qweight"):
                dtype, shape, _ = tensors[name]
                modules[module] = _logical(suffix, dtype, shape)
        for name in [n for n in tensors if n.rpartition(".")[0] in modules]:
            del tensors[name]
        for module, (o, i) in modules.items():
            for suffix, spec in qf.FORMATS[fmt](o, i).items():
                tensors[f"{module}.{suffix}"] = spec

    return mutate


def _logical(suffix: str, dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
    if suffix == "qweight":  # GPTQ [in/8, out] (AWQ is not re-stored by the corpus)
        return shape[1], shape[0] * 8
    if dtype == "U8":  # FP4 packed [out, in/2]
        return shape[0], shape[1] * 2
    if dtype == "I32":  # CT pack-quantized [out, in/8]
        return shape[0], shape[1] * 8
    return shape[0], shape[1]


# ---- exclusion lists as producers write them --------------------------------------------------------
def routers(m: Model) -> list[str]:
    return m.names("router")
