"""Torch-free checks of a source checkpoint, shared by the exporter and the service's job submission.

`inspect_checkpoint` is everything `open_source` checks before it reads a weight: pickle-only
directories are refused, the validator's header pass (config.json, index, every shard's header and
size) must find nothing unreadable, and the layout must place the decoder's modules. The service
runs `check_local_source` when a job is submitted, so an unreadable source is answered at once
with the message the worker would give seconds later (the worker still checks: files can change
between the two).
"""

from __future__ import annotations

from pathlib import Path

from quantgate.exporter.quantized_source import refuse_quantized_source
from quantgate.validators.checkpoint import CheckpointView, open_checkpoint
from quantgate.validators.errors import CheckpointReadError, UnsupportedArchitectureError
from quantgate.validators.layout import Kind, Layout, build_layout
from quantgate.validators.safetensors_header import TensorInfo

__all__ = [
    "DECODER_KINDS",
    "PICKLE_SUFFIXES",
    "check_local_source",
    "check_supported",
    "inspect_checkpoint",
    "no_such_source",
    "refuse_pickle_only",
]

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def no_such_source(source: str) -> CheckpointReadError:
    return CheckpointReadError(f"{source}: no such file or directory (and not a Hub repo id like org/name)")


def inspect_checkpoint(path: Path, source: str, *, refuse_quantized: bool = False
                       ) -> tuple[CheckpointView, Layout]:
    """The header view and layout of the checkpoint at `path` (resolved; `source` as the user named it).

    Raises CheckpointReadError (unreadable, pickle-only, no safetensors) or UnsupportedArchitectureError;
    with `refuse_quantized` (a source to quantize) also AlreadyQuantizedError, decided from the config
    and headers before the layout is built (exporter.quantized_source).
    """
    refuse_pickle_only(path)
    view = open_checkpoint(str(path))
    if view.problems:
        first = view.problems[0]
        raise CheckpointReadError(f"{source}: {first.message} ({first.code}); fix: {first.fix}")
    if refuse_quantized:
        refuse_quantized_source(view.config, view.hf_quant_config, view.tensors)
    layout = build_layout(view.tensors, view.config)
    check_supported(layout, source, view.tensors)
    return view, layout


def check_local_source(source: str) -> None:
    """Submit-time check of a local source path: what `open_source` would refuse, refused now."""
    path = Path(source).expanduser()
    if not path.exists():
        raise no_such_source(source)
    inspect_checkpoint(path.resolve(), source, refuse_quantized=True)


def refuse_pickle_only(path: Path) -> None:
    """Refuse a directory (or file) that holds pickle weights and no safetensors."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointReadError(f"{path}: pickle checkpoint ({path.suffix}) refused: loading it executes "
                                      "code. Convert it to safetensors first.")
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointReadError(f"{path}: only pickle weights ({', '.join(pickles[:3])}) and no .safetensors; "
                                  "quantgate refuses pickle checkpoints. Convert them to safetensors first.")
    raise CheckpointReadError(f"{path}: no .safetensors files in this directory")


#: Kinds that make a checkpoint a decoder we can quantize.
DECODER_KINDS: frozenset[Kind] = frozenset({Kind.ATTENTION, Kind.MLP, Kind.EXPERT, Kind.SHARED_EXPERT})


def check_supported(layout: Layout, source: str, tensors: dict[str, TensorInfo] | None = None) -> None:
    """The layout must place the decoder's Linears, and every fused 3-D expert tensor.

    A fused expert tensor the layout could not expand would silently stay BF16 under a quantized
    claim, the exact failure quantgate exists to prevent, so it is an error, not a warning.
    """
    if not any(layout.by_kind(kind) for kind in DECODER_KINDS):
        raise UnsupportedArchitectureError(
            f"{source}: unsupported architecture {layout.architecture or 'unknown'}: no attention, MLP or expert "
            "modules recognised in the tensor names")
    fused_expanded = {m.fused.tensor for m in layout.modules.values() if m.fused is not None}
    shapes = {n: t.shape for n, t in (tensors or {}).items()}
    stray = [name for name in layout.unassigned if name not in fused_expanded and "expert" in name
             and len(shapes.get(name, ())) == 3]
    stray += [m.name for m in layout.modules.values() if m.kind is Kind.OTHER and "expert" in m.name
              and any(len(t.shape) == 3 for t in m.tensors.values())]
    if stray:
        raise UnsupportedArchitectureError(
            f"{source}: unsupported expert layout in {layout.architecture or 'this model'}: cannot place "
            f"{stray[0]}" + (f" (+{len(stray) - 1} more)" if len(stray) > 1 else ""))
