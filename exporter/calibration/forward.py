"""Calibration: run data through the transformers model and record the input amax of every module
the plan quantizes with static input scales.

`calibrate(source, plan, ...)` loads the model (bf16; `device_map="auto"` on CUDA, CPU otherwise;
`trust_remote_code=False`), builds token batches (`calibration.data`), and calls `calibrate_model`, which
works on any already-loaded model: forward pre-hooks on the bound `nn.Linear`s, the
`quantgate_calib` experts implementation / dense-experts hooks (`calibration.experts`) for fused experts,
all under `torch.inference_mode()`. The result (`ActivationStats`, keyed by on-disk module names)
is all the weight pass needs; it is saved as `calibration.json`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from quantgate.exporter.calibration.experts import (
    CALIB_IMPLEMENTATION,
    DENSE_EXPERTS,
    RECORDER_ATTR,
    ExpertsRecorder,
    find_experts_modules,
    is_dispatched_experts,
    register_calibration_implementation,
)
from quantgate.exporter.calibration.model import (
    DEFAULT_DTYPE,
    forward_kwargs,
    input_device,
    load_calibration_model,
)
from quantgate.exporter.calibration.session import ModelSession
from quantgate.exporter.calibration.stats import (
    STATS_FILE_NAME,
    ActivationStats,
    ActivationStatsError,
    CalibrationError,
)
from quantgate.exporter.calibration.targets import Binding, Target, bind_targets, resolve_targets
from quantgate.exporter.progress import ProgressCallback, emit
from quantgate.validators.errors import UnsupportedArchitectureError, UsageError

__all__ = [
    "STATS_FILE_NAME",
    "ActivationStats",
    "ActivationStatsError",
    "CalibrationError",
    "calibrate",
    "calibrate_model",
    "load_calibration_model",
]

logger = logging.getLogger(__name__)


class _LinearRecorder:
    """Running max |input| per runtime Linear, kept as device tensors (no host sync per call)."""

    def __init__(self) -> None:
        self.amax: dict[str, Tensor] = {}

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            value = args[0].detach().abs().amax().float()
            prev = self.amax.get(name)
            self.amax[name] = value if prev is None else torch.maximum(prev, value)

        return pre_hook


@contextmanager
def _instrumented(
    model: nn.Module,
    binding: Binding,
    experts_modules: dict[str, nn.Module],
    *,
    all_experts: bool,
    linear_recorder: _LinearRecorder,
):
    """Install hooks / recorders / the calibration experts implementation; undo everything on exit."""
    handles = []
    recorders: dict[str, ExpertsRecorder] = {}
    modules = dict(model.named_modules())
    dispatched = {n: experts_modules[n] for n in binding.experts if is_dispatched_experts(experts_modules[n])}
    previous_impl = getattr(model.config, "_experts_implementation", None)
    try:
        for name in binding.linears:
            handles.append(modules[name].register_forward_pre_hook(linear_recorder.hook(name)))
        for name in binding.experts:
            module = experts_modules[name]
            output_impl = (
                getattr(module.config, "_experts_implementation", None) if name in dispatched else None
            )
            if output_impl == CALIB_IMPLEMENTATION:
                output_impl = "grouped_mm"
            recorder = ExpertsRecorder(
                module, name, all_experts=all_experts, output_implementation=output_impl
            )
            recorders[name] = recorder
            if name in dispatched:
                setattr(module, RECORDER_ATTR, recorder)
            else:
                handles.extend(_dense_hooks(modules, name, module, recorder))
        if dispatched:
            register_calibration_implementation()
            model.set_experts_implementation(CALIB_IMPLEMENTATION)
            stuck = [
                n for n, m in dispatched.items() if m.config._experts_implementation != CALIB_IMPLEMENTATION
            ]
            if stuck:
                raise CalibrationError(
                    f"could not switch experts implementation of {stuck[:3]} to "
                    f"{CALIB_IMPLEMENTATION!r}; this transformers version dispatches differently"
                )
        yield recorders
    finally:
        for handle in handles:
            handle.remove()
        for module in dispatched.values():
            if hasattr(module, RECORDER_ATTR):
                delattr(module, RECORDER_ATTR)
        if dispatched and previous_impl is not None:
            model.set_experts_implementation(previous_impl)


def _dense_hooks(
    modules: dict[str, nn.Module], name: str, module: nn.Module, recorder: ExpertsRecorder
) -> list:
    """Dense experts: pre-hook on the experts module; forward hook on the sibling router for its logits."""
    spec = DENSE_EXPERTS[type(module).__name__]
    parent = modules.get(name.rpartition(".")[0])
    router = getattr(parent, spec.router_attr, None) if parent is not None else None
    handles = [module.register_forward_pre_hook(lambda _m, args: recorder.observe_dense(args[0]))]
    if router is None:
        logger.warning(
            "%s: no router %r next to the experts; all-experts statistics use routed tokens only",
            name,
            spec.router_attr,
        )
        return handles

    def router_hook(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        recorder.pending_router = (args[0].detach(), output[spec.logits_index].detach())

    handles.append(router.register_forward_hook(router_hook))
    return handles


def _finalize(
    targets: Sequence[Target],
    binding: Binding,
    linear_recorder: _LinearRecorder,
    recorders: dict[str, ExpertsRecorder],
    all_experts: bool,
) -> ActivationStats:
    """Turn runtime recordings into on-disk-keyed stats, with fallbacks and warnings."""
    amax: dict[str, float] = {}
    stats = ActivationStats(amax=amax)
    for runtime, names in binding.linears.items():
        value = linear_recorder.amax.get(runtime)
        for name in names:
            if value is not None:
                amax[name] = float(value)
    by_name = {t.name: t for t in targets}
    for runtime, slots in binding.experts.items():
        recorder = recorders[runtime]
        gate_up, down, tokens, missing = recorder.finalize()
        if len(missing) == recorder.num_experts:
            raise CalibrationError(f"experts module {runtime} never ran during calibration")
        per_input = {"gate_up": gate_up, "down": down}
        groups: dict[str, set[int]] = {}
        for (expert, which), names in slots.items():
            for name in names:
                amax[name] = per_input[which][expert]
                group = by_name[name].moe_group or name.rsplit(".", 2)[0]
                groups.setdefault(group, set()).add(expert)
                if expert in missing:
                    stats.uncalibrated.append(name)
        for group in groups:
            stats.expert_tokens[group] = list(tokens)
            stats.unrouted_experts.extend(f"{group}.{e}" for e, n in enumerate(tokens) if n == 0)
        if missing:
            stats.warnings.append(
                f"{runtime}: {len(missing)} of {recorder.num_experts} experts saw no calibration token "
                f"(experts {missing[:8]}{'...' if len(missing) > 8 else ''}); they take the layer's maximum "
                "input amax" + ("" if all_experts else " (calibrate with all experts to cover them)")
            )
    _fill_unobserved(targets, amax, stats)
    bad = [n for n, v in amax.items() if not math.isfinite(v)]
    if bad:
        raise CalibrationError(
            f"calibration produced non-finite activations in {bad[:5]}: the model overflows in its "
            "dtype on this data; check the checkpoint or the calibration data"
        )
    stats.amax = dict(sorted(amax.items()))
    return stats


def _fill_unobserved(targets: Sequence[Target], amax: dict[str, float], stats: ActivationStats) -> None:
    """A Linear that never ran (or only saw zeros) takes the maximum of its fused group (same input)."""
    lost = [t for t in targets if amax.get(t.name, 0.0) <= 0.0]
    if not lost:
        return
    group_max: dict[str, float] = {}
    for t in targets:
        if t.fused_group and amax.get(t.name, 0.0) > 0.0:
            group_max[t.fused_group] = max(group_max.get(t.fused_group, 0.0), amax[t.name])
    unresolved = []
    for t in lost:
        if t.fused_group in group_max:
            amax[t.name] = group_max[t.fused_group]
            stats.uncalibrated.append(t.name)
            stats.warnings.append(
                f"{t.name} saw no calibration input; it takes the input amax of its fused "
                f"group {t.fused_group}"
            )
        else:
            unresolved.append(t.name)
    if unresolved:
        raise CalibrationError(
            f"{len(unresolved)} module(s) never received input during calibration: {unresolved[:5]}; "
            "they are not on the model's forward path for text input. Exclude them (--exclude) or keep "
            "them BF16."
        )


def calibrate_model(
    model: nn.Module,
    targets: Any,
    batches: Iterable[Tensor],
    *,
    all_experts: bool = True,
    layout: Any | None = None,
    progress: ProgressCallback | None = None,
) -> ActivationStats:
    """Record input amax for `targets` (a Plan or module names) while running `batches` through `model`."""
    resolved = resolve_targets(targets, layout)
    if not resolved:
        raise UsageError("nothing to calibrate: the plan has no module with static input scales")
    experts_modules = find_experts_modules(model)
    binding = bind_targets(model, resolved, experts_modules)
    if binding.unbound:
        unsupported = [
            n for n, m in model.named_modules() if hasattr(m, "gate_up_proj") and n not in experts_modules
        ]
        hint = (
            f" The model has experts modules calibration does not know ({unsupported[:2]})."
            if unsupported
            else " The names do not match this model (wrong plan or layout?)."
        )
        error = UnsupportedArchitectureError if unsupported else CalibrationError
        raise error(
            f"{len(binding.unbound)} module(s) to calibrate have no counterpart in the "
            f"{type(model).__name__} runtime model: {binding.unbound[:5]}.{hint}"
        )
    batches = list(batches)
    total = sum(b.numel() for b in batches)
    device = input_device(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    observes_head = any(m is head for n, m in model.named_modules() if n in binding.linears)
    kwargs = forward_kwargs(model, all_logits=observes_head)
    linear_recorder = _LinearRecorder()
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    done = 0
    with (
        _instrumented(
            model, binding, experts_modules, all_experts=all_experts, linear_recorder=linear_recorder
        ) as recorders,
        torch.inference_mode(),
    ):
        for batch in batches:
            model(input_ids=batch.to(device), **kwargs)
            done += batch.numel()
            emit(
                progress,
                "calibrate",
                done / total,
                f"calibration: {done}/{total} tokens",
                done_tokens=done,
                total_tokens=total,
            )
        stats = _finalize(resolved, binding, linear_recorder, recorders, all_experts)
    seconds = time.perf_counter() - start
    model.train(was_training)
    stats.metadata.update(
        {
            "all_experts": all_experts,
            "tokens": total,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(total / seconds, 2) if seconds > 0 else None,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "model_class": type(model).__name__,
            "modules": len(stats.amax),
        }
    )
    for line in stats.warnings:   # data (stats.warnings) the caller shows once; not logged twice
        logger.debug("%s", line)
    return stats


def calibrate(
    source: Any,
    targets: Any,
    *,
    data: str = "random",
    samples: int = 512,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    all_experts: bool = True,
    progress: ProgressCallback | None = None,
    token: str | None = None,
    revision: str | None = None,
    layout: Any | None = None,
    seed: int = 0,
    dtype: torch.dtype = DEFAULT_DTYPE,
    session: ModelSession | None = None,
) -> ActivationStats:
    """Calibrate `source` (an exporter Source, a local model directory, or a Hub repo id) for
    `targets` (a Plan, or on-disk module names). See the module docstring.

    `session`: an `quantgate.exporter.calibration.session.ModelSession` whose model (already loaded for `auto`
    scoring, or loaded now) is used and kept; without one the model is loaded here and dropped."""
    model_ref = str(getattr(source, "path", source))
    layout = layout if layout is not None else getattr(source, "layout", None)
    owned = session is None
    if session is None:
        session = ModelSession(model_ref, device=device, dtype=dtype, token=token, revision=revision)
    model = session.model()
    load_seconds = session.load_seconds
    prepared = session.batches(data, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed)
    logger.info(
        "calibrating %s on %d x %d tokens (%s), all_experts=%s",
        model_ref,
        prepared.samples,
        prepared.seq_len,
        prepared.source,
        all_experts,
    )
    stats = calibrate_model(
        model, targets, prepared.batches, all_experts=all_experts, layout=layout, progress=progress
    )
    stats.metadata.update(
        {
            "model": model_ref,
            "data": prepared.source,
            "samples": prepared.samples,
            "seq_len": prepared.seq_len,
            "batch_size": batch_size,
            "seed": seed,
            "load_seconds": round(load_seconds, 3),
            "transformers_import_seconds": round(session.import_seconds, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "transformers_version": __import__("transformers").__version__,
            "torch_version": torch.__version__,
        }
    )
    del model
    if owned:
        session.release()
    return stats
