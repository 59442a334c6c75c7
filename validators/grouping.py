"""Fold long lists of module names into brace ranges: 12,000 expert names read as one line.

`fold_names(["model.layers.3.mlp.experts.0.down_proj", ..., "model.layers.60.mlp.experts.255.down_proj"])`
-> `["model.layers.{3..60}.mlp.experts.{0..255}.down_proj"]`. Numeric dotted segments are the
fields. Folding is exact (the output expands back to exactly the input set), deterministic, and
linear in the number of names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

Template = tuple[str | None, ...]     # dotted segments, None where a numeric field sits


def format_ints(values: Iterable[int]) -> str:
    """[0,1,2,3,5,7,8,9] -> "{0..3,5,7..9}"; one value -> "5" (no braces)."""
    ordered = sorted(set(values))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j == i:
            runs.append(str(ordered[i]))
        elif j == i + 1:
            runs.extend((str(ordered[i]), str(ordered[j])))
        else:
            runs.append(f"{ordered[i]}..{ordered[j]}")
        i = j + 1
    return runs[0] if len(ordered) == 1 else "{" + ",".join(runs) + "}"


def _split(name: str) -> tuple[Template, tuple[int, ...]]:
    template: list[str | None] = []
    fields: list[int] = []
    for seg in name.split("."):
        if seg.isdigit() and (seg == "0" or not seg.startswith("0")):
            template.append(None)
            fields.append(int(seg))
        else:
            template.append(seg)
    return tuple(template), tuple(fields)


def _fold_fields(rows: list[tuple[int, ...]]) -> list[tuple[str, ...]]:
    """Exact cover of a set of int tuples by products of int sets, folding the last field first."""
    if not rows or not rows[0]:
        return [()]
    if len(rows[0]) == 1:
        return [(format_ints(r[0] for r in rows),)]
    by_prefix: dict[tuple[int, ...], set[int]] = defaultdict(set)
    for r in rows:
        by_prefix[r[:-1]].add(r[-1])
    by_last: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for prefix, lasts in by_prefix.items():
        by_last[format_ints(lasts)].append(prefix)
    out: list[tuple[str, ...]] = []
    for last, prefixes in by_last.items():
        out.extend(folded + (last,) for folded in _fold_fields(prefixes))
    return out


def _render(template: Template, fields: tuple[str, ...]) -> str:
    it = iter(fields)
    return ".".join(next(it) if seg is None else seg for seg in template)


def _sort_key(text: str) -> tuple:
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in text.replace("{", ".").split("."))


def fold_names(names: Iterable[str]) -> list[str]:
    """Fold names sharing a template into brace ranges; returns sorted, de-duplicated lines."""
    groups: dict[Template, list[tuple[int, ...]]] = defaultdict(list)
    heads: dict[str, tuple[Template, tuple[int, ...]]] = {}   # `_split` of everything before the last dot
    for name in set(names):   # = groups[_split(name)[0]].append(_split(name)[1]), the head split once
        head, dot, last = name.rpartition(".")
        template, fields = (), ()
        if dot:
            split = heads.get(head)
            if split is None:
                split = heads[head] = _split(head)
            template, fields = split
        if last.isdigit() and (last == "0" or not last.startswith("0")):
            groups[(*template, None)].append((*fields, int(last)))
        else:
            groups[(*template, last)].append(fields)
    lines = [_render(t, f) for t, rows in groups.items() for f in _fold_fields(rows)]
    return sorted(lines, key=_sort_key)


def expand(folded: str) -> list[str]:
    """Inverse of `fold_names` for one line (used by tests and by the HTML view)."""
    import itertools
    import re

    parts = re.split(r"(\{[^}]*\}|(?<![^.])\d+(?![^.]))", folded)
    choices: list[list[str]] = []
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            values: list[str] = []
            for run in part[1:-1].split(","):
                lo, _, hi = run.partition("..")
                values.extend(str(v) for v in range(int(lo), int(hi or lo) + 1))
            choices.append(values)
        else:
            choices.append([part])
    return ["".join(c) for c in itertools.product(*choices)]
