"""CheckpointView: every tensor header, config and integrity problem of a checkpoint, no weights read.

`open_checkpoint` accepts a directory (with or without `model.safetensors.index.json`), a single
`.safetensors` file, or a Hugging Face Hub repo (`org/name[@rev]`, `hf://org/name@rev`; see
`validators/hub.py`). It keeps reading what can be read: a missing, corrupt or hostile shard
becomes a `Problem` (a QG6xx finding later) and the other shards are still read. It raises
`CheckpointReadError` only when there is nothing to read at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from quantgate.validators import safetensors_fast
from quantgate.validators.errors import CheckpointReadError, HeaderError
from quantgate.validators.integrity import (
    Problem,
    check_index,
    check_shard_name,
    merge_shards,
    problem,
    refuse_escape,
    shard_reference_counts,
)
from quantgate.validators.safetensors_header import SafetensorsHeader, TensorInfo, gc_paused, read_header

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CheckpointView", "Problem", "load_json_file", "open_checkpoint"]

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
QUANT_CONFIG_FILE = "hf_quant_config.json"
SAFETENSORS_SUFFIX = ".safetensors"
HUB_SCHEME = "hf://"                          # forces the Hub (validators/hub.py)
MAX_CONFIG_BYTES = 16 * 1024 * 1024          # config.json / hf_quant_config.json
MAX_INDEX_BYTES = 256 * 1024 * 1024          # a 180k-tensor index is ~17 MB
MAX_READ_VALUES_BYTES = 64 * 1024 * 1024     # read_values is for scales, not weights
# Files that hold weights (never listed by other_files; pickle formats are never opened).
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class CheckpointView:
    """Headers, configs and integrity problems of one checkpoint (see module docstring)."""

    def __init__(self, *, target: str, kind: str, tensors: dict[str, TensorInfo],
                 config: dict | None, hf_quant_config: dict | None, index: dict | None,
                 files: list[str], problems: list[Problem], headers: Mapping[str, SafetensorsHeader],
                 root: Path | None = None, revision: str | None = None,
                 repo_files: Sequence[str] = ()) -> None:
        self.target = target
        self.kind = kind                    # "directory" | "file" | "hub"
        self.tensors = tensors
        self.config = config
        self.hf_quant_config = hf_quant_config
        self.index = index
        self.files = files                  # shard files whose headers were read
        self.problems = problems
        self.headers = dict(headers)        # shard file -> parsed header (data offsets for reads)
        self.root = root                    # local directory holding the shards; None for hub
        self.revision = revision            # hub: the commit the view was read at
        self._repo_files = list(repo_files)

    def __repr__(self) -> str:
        return (f"CheckpointView({self.target!r}, kind={self.kind!r}, tensors={len(self.tensors)}, "
                f"files={len(self.files)}, problems={len(self.problems)})")

    def read_values(self, name: str) -> np.ndarray:
        """float64 values of one small tensor, reading only its bytes (local checkpoints only)."""
        from quantgate.validators.values import decode_values

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointReadError(f"{self.target}: no tensor named {name!r}")
        if self.root is None:
            raise CheckpointReadError(f"{name}: tensor values of Hub checkpoints are not downloaded; "
                                      "download the repo and validate the local copy for scale checks")
        if info.nbytes > MAX_READ_VALUES_BYTES:
            raise CheckpointReadError(f"{name}: {info.nbytes} bytes is over the {MAX_READ_VALUES_BYTES}-byte "
                                      "read_values limit (meant for scale tensors)")
        header = self.headers[info.file]
        try:
            with open(self.root / info.file, "rb") as f:
                f.seek(header.data_offset + info.start)
                raw = f.read(info.nbytes)
        except OSError as exc:
            raise CheckpointReadError(f"{info.file}: cannot read {name}: {exc.strerror or exc}") from exc
        if len(raw) != info.nbytes:
            raise CheckpointReadError(f"{info.file}: truncated while reading {name} "
                                      f"({len(raw)} of {info.nbytes} bytes)")
        return decode_values(raw, info.dtype, info.shape, label=name)

    def other_files(self) -> list[str]:
        """Non-weight files of the checkpoint (tokenizer, configs, generation_config ...), sorted."""
        if self.root is None:
            names = self._repo_files
        else:
            names = [p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
        return sorted(n for n in names if not n.endswith(WEIGHT_FILE_SUFFIXES) and not n.endswith(".index.json"))


def open_checkpoint(target: str, *, revision: str | None = None, token: str | None = None,
                    allowed_roots: Sequence[Path] | None = None) -> CheckpointView:
    """Open a local directory, a `.safetensors` file or a Hub repo as a CheckpointView.

    An existing local path always wins over a repo id; `./x`, `/x` and `~/x` are always local.
    `allowed_roots` lists extra directories that symlinked shards may resolve into (symlinks
    leaving the checkpoint directory are otherwise refused as QG605). `revision` and `token`
    apply to Hub repos only; the token is never written into messages.
    """
    if target.startswith(HUB_SCHEME) or not _exists(target):   # the Hub client only when it may be needed
        from quantgate.validators import hub

        hub_ref = hub.parse_hub_target(target, revision)
        if hub_ref is not None:
            return hub.open_hub_checkpoint(target, hub_ref[0], hub_ref[1], token=token)
    path = Path(target).expanduser()
    try:
        if not path.exists():
            raise CheckpointReadError(f"{target}: no such file or directory (expected a checkpoint directory, "
                                      "a .safetensors file or a Hub repo id like org/name)")
        roots = [Path(r).resolve() for r in (allowed_roots or ())]
        with gc_paused():
            if path.is_dir():
                return _open_directory(target, path, roots)
            if path.name.endswith(SAFETENSORS_SUFFIX):
                return _open_file(target, path)
    except OSError as exc:          # permission denied on the directory itself, and the like
        raise CheckpointReadError(f"{target}: cannot read: {exc.strerror or exc}") from None
    raise CheckpointReadError(f"{target}: not a .safetensors file or a checkpoint directory")


def _exists(target: str) -> bool:
    """An existing local path (which always wins over a Hub repo id); False when unsure."""
    try:
        return Path(target).expanduser().exists()
    except (OSError, RuntimeError, ValueError):    # unknown ~user, NUL byte ...: let hub.py decide
        return False


def _open_file(target: str, path: Path) -> CheckpointView:
    """A single .safetensors file; config.json / hf_quant_config.json are read from its directory."""
    root = path.parent
    problems: list[Problem] = []
    headers = _read_shards(root, [path.name], problems, None)
    tensors = merge_shards(headers, problems)
    return CheckpointView(
        target=target, kind="file", tensors=tensors, root=root,
        config=_local_json(root, CONFIG_FILE, MAX_CONFIG_BYTES, problems, None),
        hf_quant_config=_local_json(root, QUANT_CONFIG_FILE, MAX_CONFIG_BYTES, problems, None),
        index=None, files=list(headers), problems=problems, headers=headers)


def _open_directory(target: str, root: Path, allowed_roots: list[Path]) -> CheckpointView:
    problems: list[Problem] = []
    escape_roots = _escape_roots(root, allowed_roots)
    on_disk = sorted(p.name for p in root.iterdir() if p.name.endswith(SAFETENSORS_SUFFIX))
    index = _local_json(root, INDEX_FILE, MAX_INDEX_BYTES, problems, escape_roots, shard_names=on_disk)
    weight_map = _weight_map(index, problems)
    if weight_map is None and not on_disk:
        raise CheckpointReadError(_not_a_checkpoint(target, root))
    if weight_map is None:
        shards = on_disk
    else:
        shards = _index_shards(root, weight_map, set(on_disk), problems)
    headers = _read_shards(root, shards, problems, escape_roots)
    tensors = merge_shards(headers, problems)
    if weight_map is not None:
        problems += check_index(weight_map, headers)
    return CheckpointView(
        target=target, kind="directory", tensors=tensors, root=root,
        config=_local_json(root, CONFIG_FILE, MAX_CONFIG_BYTES, problems, escape_roots),
        hf_quant_config=_local_json(root, QUANT_CONFIG_FILE, MAX_CONFIG_BYTES, problems, escape_roots),
        index=index if weight_map is not None else None, files=list(headers), problems=problems,
        headers=headers)


def _not_a_checkpoint(target: str, root: Path) -> str:
    pickles = sorted(p.name for p in root.glob("*.bin"))
    if pickles:
        return (f"{target}: only pickle weights ({pickles[0]} ...) and no .safetensors files; quantgate "
                "never loads pickles: convert the checkpoint to safetensors first")
    return (f"{target}: no .safetensors files or {INDEX_FILE} in this directory; point quantgate at a "
            "Hugging Face checkpoint directory (the one holding config.json and the weight shards)")


def _weight_map(index: dict | None, problems: list[Problem]) -> dict | None:
    """The index's weight_map, or None (no index, or an unusable one: reported, shards globbed)."""
    if index is None:
        return None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        problems.append(problem("QG606", f"{INDEX_FILE} has no weight_map object; reading the *.safetensors "
                                "files in the directory instead", (INDEX_FILE,),
                                "regenerate the index with save_pretrained (or delete it for a single shard)"))
        return None
    return weight_map


def _index_shards(root: Path, weight_map: dict, on_disk: set[str], problems: list[Problem]) -> list[str]:
    """Shard names the index references that are safe to open and exist; problems for the rest."""
    counts = shard_reference_counts(weight_map)
    shards: list[str] = []
    for name, tensors in counts.items():
        refusal = check_shard_name(name)
        if refusal:
            problems.append(problem("QG605", f"{INDEX_FILE} maps {tensors} tensor(s) to {name!r}: {refusal}; "
                                    "refused, never opened", (str(name),),
                                    "fix the weight_map: shard names are plain file names in the checkpoint "
                                    "directory"))
        elif not (root / name).is_file():
            problems.append(problem("QG601", f"{INDEX_FILE} maps {tensors} tensor(s) to shard {name!r}, which "
                                    "does not exist", (name,),
                                    "copy the missing shard into the checkpoint, or re-export the checkpoint"))
        else:
            shards.append(name)
    referenced = set(counts)
    for name in sorted(on_disk - referenced):
        problems.append(problem("QG604", f"shard {name!r} is on disk but {INDEX_FILE} does not reference it; "
                                "engines following the index never load it", (name,),
                                "delete the stray shard, or regenerate the index if its tensors belong to "
                                "the model"))
    return sorted(shards)


def _escape_roots(root: Path, allowed_roots: list[Path]) -> list[Path]:
    """Where a shard's real path may lie: the checkpoint, `allowed_roots`, and for a Hugging Face
    cache snapshot (`models--org--name/snapshots/<sha>/`, whose files link to `../../blobs/`)
    that repo's blob store."""
    real = root.resolve()
    roots = [real, *allowed_roots]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def _escaping(root: Path, name: str, escape_roots: list[Path] | None, problems: list[Problem]) -> bool:
    """True (and a QG605 problem) when `root/name` really lives outside `escape_roots`."""
    refusal = refuse_escape(root / name, escape_roots) if escape_roots is not None else None
    if refusal:
        problems.append(problem("QG605", f"{name!r} {refusal}; refused, never opened", (name,),
                                "copy the file into the checkpoint directory, or allow its location "
                                "explicitly (allowed_roots)"))
    return refusal is not None


def _local_json(root: Path, name: str, max_bytes: int, problems: list[Problem],
                escape_roots: list[Path] | None, shard_names: Sequence[str] = ()) -> dict | None:
    path = root / name
    if not path.exists() or _escaping(root, name, escape_roots, problems):
        return None
    return load_json_file(path, name, max_bytes, problems, shard_names)


def _read_shards(root: Path, shards: list[str], problems: list[Problem],
                 escape_roots: list[Path] | None) -> dict[str, SafetensorsHeader]:
    """Headers of the shards that can be read; a QG602/QG605 problem for each that cannot.
    `escape_roots` None skips the symlink check (a file the user named explicitly)."""
    headers: dict[str, SafetensorsHeader] = {}
    for name in shards:
        path = root / name
        if _escaping(root, name, escape_roots, problems):
            continue
        try:
            headers[name] = read_header(path, file_name=name)
        except HeaderError as exc:
            problems.append(problem("QG602", f"shard {name!r} is unreadable: {exc.problem}", (name,),
                                    "re-download or re-export this shard; its tensors are missing from "
                                    "the checkpoint as it stands"))
    return headers


def load_json_file(path: Path, label: str, max_bytes: int, problems: list[Problem],
                   shard_names: Sequence[str] = ()) -> dict | None:
    """A JSON object from a small file, or None when absent; QG606 (and None) when it is not usable.
    `shard_names` (for an index): its `weight_map` values that equal one of them are that string."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(problem("QG606", f"{label} cannot be read: {exc.strerror or exc}", (label,),
                                f"make {label} a readable regular file"))
        return None
    if shard_names and len(raw) <= max_bytes:
        index = _fast_index_object(raw, shard_names)
        if index is not None:
            return index
    return parse_json_object(raw, label, max_bytes, problems)


def parse_json_object(raw: bytes, label: str, max_bytes: int, problems: list[Problem]) -> dict | None:
    """Decode `raw` as one JSON object no larger than `max_bytes`; QG606 (and None) otherwise."""
    reason = None
    if len(raw) > max_bytes:
        reason = f"is larger than the {max_bytes}-byte limit"
    else:
        fast = _fast_json_object(raw)
        if fast is not None:
            return fast
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            reason = f"is not UTF-8 (bad byte at offset {exc.start})"
        except RecursionError:
            reason = "is nested too deeply"
        except ValueError as exc:
            reason = f"is not valid JSON ({exc})"
        else:
            if isinstance(obj, dict):
                return obj
            reason = f"must hold a JSON object, not {type(obj).__name__}"
    problems.append(problem("QG606", f"{label} {reason}; ignored", (label,), f"fix or regenerate {label}"))
    return None


def _fast_json_object(raw: bytes) -> dict | None:
    """`raw` as a JSON object through the optional C decoder (a 180k-tensor index is 17 MB), or
    None: no such decoder, or anything for the stdlib path to report. The decoder accepts only
    JSON that `json.loads` accepts too, with the same result (UTF-8 checked, same integer digit
    limit, last duplicate key wins), so a dict from here is the dict `json.loads` would give."""
    loads = safetensors_fast.fast_json_loads
    if loads is None:
        return None
    try:
        obj = loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj if type(obj) is dict else None


def _fast_index_object(raw: bytes, shard_names: Sequence[str]) -> dict | None:
    """An index as `_fast_json_object` decodes it, except that the weight_map's values, when all
    of them name one of `shard_names`, are one shared string per shard (a `Literal` type's)
    rather than 180k equal copies: 15 MB less, and as the shards are opened under those names,
    the index checks compare them by identity. None: no fast decoder, or anything for the
    generic paths. The top level is decoded key by key from raw JSON values,
    so key order and duplicate keys come out as `json.loads` gives them."""
    msgspec = safetensors_fast.msgspec
    loads = safetensors_fast.fast_json_loads
    if msgspec is None or loads is None:
        return None
    try:
        top = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
        typed = msgspec.json.Decoder(dict[str, Literal[tuple(shard_names)]]).decode   # type: ignore[misc]
        index = {}
        for key, value in top.items():
            if key == "weight_map":
                try:
                    index[key] = typed(value)
                    continue
                except msgspec.ValidationError:     # a value names no shard on disk: plain strings
                    pass
            index[key] = loads(value)
    except (ValueError, RecursionError):
        return None
    return index
