"""Integrity checks shared by local and Hub checkpoints: shard names, symlinks, index vs headers.

Each check returns `Problem`s (QG6xx findings later) instead of raising, so that one bad shard
or index entry never hides the rest of the checkpoint.

| code  | problem |
|-------|---------|
| QG601 | the index names a shard that does not exist |
| QG602 | a shard header is corrupt, truncated or hostile |
| QG603 | the index's weight_map disagrees with the shard contents (or a tensor is in two shards) |
| QG604 | a shard is present but the index does not reference it |
| QG605 | a hostile index entry or an escaping symlink, refused and never opened |
| QG606 | config.json / hf_quant_config.json / the index is not usable JSON |
| QG607 | the index names a tensor that its shard (and every other shard) lacks |
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from quantgate.validators.safetensors_header import SafetensorsHeader, TensorInfo

SHOWN_NAMES = 3     # tensor names quoted in a message before "and N more"


@dataclass(frozen=True)
class Problem:
    """An integrity problem found while opening a checkpoint (becomes a QG6xx finding)."""

    code: str                   # "QG601" ... "QG607"
    message: str
    files: tuple[str, ...]      # shard / config files (or tensor names) concerned
    fix: str


def problem(code: str, message: str, files: Sequence[str], fix: str) -> Problem:
    return Problem(code=code, message=message, files=tuple(files), fix=fix)


def check_shard_name(name: object) -> str | None:
    """Why an index weight_map value must not be opened, or None when it is a safe relative name.

    Refused: non-strings, empty names, absolute POSIX or Windows paths (drive, root, UNC),
    backslashes, `..` or `.` components, NUL bytes, and anything not ending in `.safetensors`
    (a `.bin` entry would mean loading a pickle).
    """
    if not isinstance(name, str):
        return f"shard name must be a string, got {type(name).__name__}"
    if not name or "\x00" in name:
        return "empty shard name or NUL byte in it"
    if "\\" in name or PureWindowsPath(name).drive or PureWindowsPath(name).root or name.startswith("/"):
        return "absolute path or Windows path separator"
    if any(part in ("..", ".", "") for part in name.split("/")):
        return "path with '..', '.' or empty components"
    if not name.endswith(".safetensors"):
        return "not a .safetensors file"
    return None


def shard_reference_counts(weight_map: Mapping[str, object]) -> dict[object, int]:
    """Distinct shard names of an index's weight_map -> number of tensors mapped to each.

    Unhashable values (lists, objects: a hostile index) are keyed by their repr; like any other
    non-string they are refused later by `check_shard_name`."""
    try:
        return dict(Counter(weight_map.values()))
    except TypeError:
        return dict(Counter(v if isinstance(v, str) else repr(v) for v in weight_map.values()))


def refuse_escape(path: Path, roots: Sequence[Path]) -> str | None:
    """Why `path` must not be opened (its real location is outside every root), or None."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:     # symlink loop
        return f"cannot be resolved ({exc})"
    if any(real.is_relative_to(root) for root in roots):
        return None
    return f"is a symlink to {real}, outside the checkpoint directory"


def merge_shards(headers: Mapping[str, SafetensorsHeader], problems: list[Problem]) -> dict[str, TensorInfo]:
    """All tensors of all shards; a tensor stored in two shards is kept once and reported (QG603)."""
    tensors: dict[str, TensorInfo] = {}
    total = 0
    for header in headers.values():
        tensors.update(header.tensors)
        total += len(header.tensors)
    if total == len(tensors):
        return tensors
    tensors = {}
    duplicates: dict[str, list[str]] = {}
    for header in headers.values():
        for name, info in header.tensors.items():
            first = tensors.setdefault(name, info)
            if first is not info:
                duplicates.setdefault(name, [first.file]).append(info.file)
    for name, files in duplicates.items():
        problems.append(problem(
            "QG603", f"tensor {name!r} is stored in {len(files)} shards ({', '.join(files)}); engines load "
            "whichever comes last", tuple(files), "re-export the checkpoint so each tensor is stored once"))
    return tensors


def check_index(weight_map: Mapping[str, object], headers: Mapping[str, SafetensorsHeader]) -> list[Problem]:
    """QG603 / QG607 problems where the index and the readable shards disagree (one per shard and kind).

    Entries pointing at shards that were not read (missing, refused, corrupt) are skipped: those
    shards already have their own problem.
    """
    if _index_matches(weight_map, headers):
        return []
    actual: dict[str, str] = {}
    for header in headers.values():
        actual.update(dict.fromkeys(header.tensors, header.file))
    absent: dict[str, list[str]] = {}
    misplaced: dict[str, list[str]] = {}
    for name, listed in weight_map.items():
        if not isinstance(listed, str) or listed not in headers:
            continue
        found = actual.get(name)
        if found is None:
            absent.setdefault(listed, []).append(name)
        elif found != listed:
            misplaced.setdefault(listed, []).append(name)
    unlisted: dict[str, list[str]] = {}
    for name, found in actual.items():
        if name not in weight_map:
            unlisted.setdefault(found, []).append(name)
    problems = []
    for shard, names in absent.items():
        problems.append(problem("QG607", f"the index lists {_names(names)} in {shard!r}, but that shard does "
                                "not contain them (and no other shard does)", tuple(names),
                                "regenerate model.safetensors.index.json from the shards, or restore the "
                                "missing tensors"))
    for shard, names in misplaced.items():
        problems.append(problem("QG603", f"the index lists {_names(names)} in {shard!r}, but they are stored "
                                "in another shard", (shard,), "regenerate model.safetensors.index.json "
                                "from the shards"))
    for shard, names in unlisted.items():
        problems.append(problem("QG603", f"shard {shard!r} holds {_names(names)} that the index does not list "
                                "(a stale index)", (shard,),
                                "regenerate model.safetensors.index.json from the shards"))
    return problems


def _index_matches(weight_map: Mapping[str, object], headers: Mapping[str, SafetensorsHeader]) -> bool:
    """weight_map == {tensor: shard} over all headers, without building that 180k-entry dict.

    Every shard's tensors are listed under that shard (C-level lookups and one `count`), and the
    weight_map has no more entries than the shards hold. A tensor stored in two shards cannot be
    listed under both, so it fails the per-shard test; an entry for a missing or unread shard
    fails the size comparison."""
    if not isinstance(weight_map, dict):
        return False
    listed = weight_map.__getitem__
    total = 0
    for header in headers.values():
        try:
            shards = list(map(listed, header.tensors))
        except KeyError:
            return False
        if shards.count(header.file) != len(shards):
            return False
        total += len(shards)
    return total == len(weight_map)


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:SHOWN_NAMES])
    more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return f"{len(names)} tensor(s) ({shown}{more})"
