"""`run_quantize`: source -> layout -> plan -> calibrate -> quantize + write (streaming) -> validate -> rename.

Output goes to a temporary sibling directory `.<name>.tmp-<id>`; it is renamed to the final path
only when the validator reports no error finding. A failed validation keeps the output, with its
`quantgate-report.json` / `.html`, at `<out>.failed-validation` for inspection; an exception
removes the temporary directory. The final path is never half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter import device_warmup
from quantgate.exporter.auto.options import (
    AUTO_RECIPE,
    DEFAULT_CANDIDATES,
    DEFAULT_METHOD,
    DEFAULT_SCORE_SAMPLES,
    check_auto_request,
)
from quantgate.exporter.calibration.process import CalibrationProcess
from quantgate.exporter.calibration.session import ModelSession
from quantgate.exporter.calibration.stats import STATS_FILE_NAME, ActivationStats
from quantgate.exporter.deferred_scales import DeferredInputScales
from quantgate.exporter.jsonfile import write_json_atomic
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS, NUMERICS_MODES
from quantgate.exporter.overlap import overlap_enabled, overlap_start, run_concurrently
from quantgate.exporter.progress import ProgressCallback, emit
from quantgate.exporter.recipes import WRITABLE_DIALECTS, Plan, check_dialect, get_recipe, make_plan, resolve_dialect
from quantgate.exporter.source import Source, open_source
from quantgate.exporter.writers.bmm_experts import check_bmm_plan
from quantgate.exporter.weight_pass import REPORT_HTML, REPORT_JSON, WriteStats, write_export
from quantgate.exporter.writers.shard_plan import DEFAULT_SHARD_SIZE
from quantgate.validators.errors import UsageError

log = logging.getLogger(__name__)

FAILED_SUFFIX = ".failed-validation"


@dataclass
class QuantizeRequest:
    source: str
    revision: str | None = None
    recipe: str = "nvfp4"
    out: str | Path = "quantized"
    dialect: str | None = None       # None: the recipe's own (`recipes.resolve_dialect`)
    calib_data: str = "random"
    calib_samples: int = 512
    calib_seq_len: int = 512
    calib_batch_size: int = 8
    calib_all_experts: bool = True
    calib_stats: str | Path | None = None
    device: str = "auto"
    exclude: Sequence[str] = ()
    shard_size: int = DEFAULT_SHARD_SIZE
    token: str | None = None
    overwrite: bool = False          # extension: replace a non-empty final directory
    # extension, recipe "auto" only (exporter.auto.options): effective-bits budget and scoring
    bits: float | None = None
    candidates: Sequence[str] = DEFAULT_CANDIDATES
    method: str = DEFAULT_METHOD
    score_samples: int = DEFAULT_SCORE_SAMPLES
    scores: str | Path | None = None  # scores file: reused when it exists, written otherwise
    # extension: whose bits the numerics reproduce, ModelOpt 0.47 run on CUDA (default) or on the CPU
    numerics: str = DEFAULT_NUMERICS

    def __post_init__(self) -> None:
        self.dialect = resolve_dialect(self.recipe, self.dialect)


@dataclass
class QuantizeResult:
    output: Path | None              # the final directory (None when validation failed)
    report: Any                      # validators.report.Report
    ok: bool
    temp_output: Path | None         # where a failed export was kept (None on success)
    warnings: list[str] = field(default_factory=list)
    stats_path: Path | None = None   # extension: calibration.json inside the export, when calibrated
    timings: dict[str, float] = field(default_factory=dict)   # extension: seconds per stage
    bytes_read: int = 0              # extension: source bytes read by the weight pass
    max_buffered_bytes: int = 0      # extension: streaming high-water mark of the shard buffer
    auto: dict | None = None         # extension: recipe "auto" summary (budget, effective_bits, by_scheme)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available on this machine")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def check_request(req: QuantizeRequest) -> Path:
    """Fail fast on bad input, before anything is read; returns the absolute final path."""
    check_auto_request(req.recipe, bits=req.bits, candidates=req.candidates, method=req.method,
                       score_samples=req.score_samples, scores=req.scores, dialect=req.dialect)
    if req.recipe != AUTO_RECIPE:
        get_recipe(req.recipe)
    if req.dialect not in WRITABLE_DIALECTS:
        raise UsageError(f"unknown dialect {req.dialect!r}; supported: {', '.join(WRITABLE_DIALECTS)}")
    if req.recipe != AUTO_RECIPE:
        check_dialect(req.recipe, req.dialect)
    if req.numerics not in NUMERICS_MODES:
        raise UsageError(f"unknown numerics {req.numerics!r}; choose one of {', '.join(NUMERICS_MODES)}")
    if req.shard_size <= 0:
        raise UsageError(f"shard size must be positive, got {req.shard_size}")
    out = Path(req.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not req.overwrite:
        raise UsageError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    _check_writable_parent(out)
    if req.calib_stats is not None and not Path(req.calib_stats).exists():
        raise UsageError(f"--calib-stats {req.calib_stats}: no such file")
    resolve_device(req.device)
    return out


def _check_writable_parent(out: Path) -> None:
    """The export is written in a hidden sibling of `out` and renamed: its nearest existing ancestor
    must be a directory this process may create entries in."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write {out}: {ancestor} is not a directory; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {out}: no permission to create files in {ancestor}; "
                         "choose a --out in a directory you can write")


def _make_temp_dir(out: Path) -> Path:
    """The hidden sibling the export is built in (renamed to `out` once validated)."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:   # a filesystem that refuses entries (sysfs, read-only mounts) whatever the mode bits
        raise UsageError(f"cannot write {out}: creating {exc.filename or tmp} failed ({exc.strerror}); "
                         "choose a --out in a directory you can write") from exc
    return tmp


def run_quantize(req: QuantizeRequest, progress: ProgressCallback | None = None, *,
                 calibration: CalibrationProcess | None = None, _writer_hook: Any = None) -> QuantizeResult:
    """Run one quantize job end to end (see module docstring). Raises QuantgateError on bad input.

    `calibration`: a calibration process already started for this request (the CLI starts it before
    importing torch: exporter.calibration.process); its statistics are used where the job calibrates
    alongside the weight pass, otherwise it is ended. The caller closes it."""
    device_warmup.start_kernels()   # where a caller has not yet: the GPU warm-up may run the quantizer now
    out = check_request(req)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    emit(progress, "plan", 0.0, f"opening {req.source}")
    source = open_source(req.source, revision=req.revision, token=req.token, refuse_quantized=True)
    auto = None
    # Loaded at most once, on first use: auto scoring and calibration share it (exporter.calibration.session).
    session = ModelSession(str(source.path), device=req.device, token=req.token, revision=req.revision)
    if req.recipe == AUTO_RECIPE:
        from quantgate.exporter.auto.stage import plan_for_request

        plan, auto = plan_for_request(req, source, progress, session=session)
    else:
        plan = make_plan(source.layout, req.recipe, req.exclude, dialect=req.dialect)
    timings["plan"] = time.perf_counter() - t0
    emit(progress, "plan", 1.0, f"{len(plan.quantized())} modules quantized, {len(plan.excluded())} left BF16",
         quantized=len(plan.quantized()), excluded=len(plan.excluded()), warnings=list(plan.warnings),
         seconds=timings["plan"])
    if not plan.quantized():
        raise UsageError(f"recipe {plan.recipe} quantizes no module of this model "
                         f"({source.architecture or 'unknown architecture'}); choose another recipe")
    check_bmm_plan(plan, source, req.dialect)   # transposed 3-D experts: what the 3-D writer can write

    tmp = _make_temp_dir(out)
    writer: WriteStats | None = None
    try:
        stats, writer = _calibrate_and_write(req, source, plan, tmp, progress, timings, session, _writer_hook,
                                             calibration)
        if auto is not None:
            from quantgate.exporter.auto.stage import write_auto_files

            write_auto_files(tmp, auto)
        extra = {"auto": auto.summary()} if auto is not None else None
        report = _validate(tmp, progress, timings, extra=extra, final=out)   # while the shards' fsyncs finish
        timings["durable_wait"] = writer.wait_durable()   # every shard on disk before the export is published
    except BaseException:
        if writer is not None:
            writer.wait_durable_quietly()   # no sync may still run on a file being removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warnings = list(plan.warnings) + (list(stats.warnings) if stats is not None else [])
    warnings += [f"validation cannot predict {engine}: {report.verdicts[engine]['reason']}"
                 for engine in report.unknown_engines]
    result = QuantizeResult(output=None, report=report, ok=report.ok, temp_output=None, warnings=warnings,
                            timings=timings, bytes_read=writer.bytes_read,
                            max_buffered_bytes=writer.max_buffered_bytes,
                            auto=auto.summary() if auto is not None else None)
    emit(progress, "finalize", 0.0, "finalizing")
    t_final = time.perf_counter()
    if report.ok:
        _replace_dir(tmp, out)
        result.output = out
        result.stats_path = out / STATS_FILE_NAME if stats is not None else None
    else:
        kept = Path(report.target)   # <out>.failed-validation[.N], chosen (and named) by _validate
        tmp.rename(kept)
        result.temp_output = kept
    timings["finalize"] = time.perf_counter() - t_final
    timings["total"] = time.perf_counter() - t0
    final = result.output or result.temp_output
    emit(progress, "finalize", 1.0, f"exported to {final}" if report.ok else
         f"validation failed; output kept at {final}", output=str(final), ok=report.ok,
         seconds=timings["finalize"], timings=dict(timings))
    return result


def _calibrate_and_write(req: QuantizeRequest, source: Source, plan: Plan, tmp: Path,
                         progress: ProgressCallback | None, timings: dict[str, float], session: ModelSession,
                         on_buffer: Any, process: CalibrationProcess | None = None
                         ) -> tuple[ActivationStats | None, WriteStats]:
    """Calibration, then the weight pass; or both at once (exporter.overlap) where that pays, with
    the input scales patched in afterwards (exporter.deferred_scales): on a thread, or in the
    calibration `process` when one was started for this job."""
    device = resolve_device(req.device)
    write = {"shard_size": req.shard_size, "device": device, "timings": timings, "on_buffer": on_buffer,
             "dialect": req.dialect, "numerics": req.numerics}
    overlap = plan.needs_calibration and req.calib_stats is None and overlap_enabled(device, req.dialect)
    if process is not None and not overlap:
        process.kill()   # started for a job that turned out not to calibrate beside the weight pass
        process = None
    if not overlap:
        try:
            stats = calibration_stage(req, source, plan, tmp, progress, timings, session)
        finally:
            session.release()   # the weight pass reads the checkpoint, never the model
        return stats, write_export(source, plan, stats, tmp, progress=progress, **write)
    deferred = DeferredInputScales(req.dialect, source, req.numerics)
    ready = threading.Event() if overlap_start() == "imports" and process is None else None
    if process is not None:   # the calibrate stage begins before the weight pass reports
        emit(progress, "calibrate", 0.0, f"calibrating in process {process.proc.pid}", pid=process.proc.pid)

    def calibrate(events: ProgressCallback | None) -> ActivationStats | None:
        if process is not None:
            return _from_process(process, plan, tmp, events, timings)
        try:
            if ready is not None:   # the calibrate stage begins before the weight pass reports
                emit(events, "calibrate", 0.0, "importing transformers")
                session.import_transformers()
                ready.set()
            return calibration_stage(req, source, plan, tmp, events, timings, session)
        finally:
            session.release()

    passes: list[WriteStats] = []

    def weight_pass(events: ProgressCallback | None, check: Any) -> WriteStats:
        passes.append(write_export(source, plan, None, tmp, progress=events, deferred=deferred, should_stop=check,
                                   **write))
        return passes[-1]

    try:
        stats, writer, together = run_concurrently(calibrate, weight_pass, progress, ready=ready,
                                                   on_failure=process.kill if process is not None else None)
    except BaseException:
        for written in passes:   # calibration failed after the pass: its syncs end before the caller removes tmp
            written.wait_durable_quietly()
        raise
    from quantgate.exporter.writers.registry import writer_for

    t = time.perf_counter()
    try:
        scales = writer_for(req.dialect).input_scales(plan, source, stats)
        patched = deferred.patch(writer.shards, scales, tmp)
    except BaseException:
        writer.wait_durable_quietly()   # the caller removes the directory
        raise
    timings.update(together, input_scales_patch=time.perf_counter() - t)
    emit(progress, "write", 1.0, f"{patched} input scales written; the weight pass ran alongside calibration "
         f"for {together['overlap_seconds']:.2f} s", patched=patched, seconds=timings["input_scales_patch"],
         **together)
    return stats, writer


def calibration_stage(req: QuantizeRequest, source: Source, plan: Plan, tmp: Path, progress: ProgressCallback | None,
                      timings: dict[str, float], session: ModelSession | None = None) -> ActivationStats | None:
    """The calibrate stage in this process: statistics read from `--calib-stats` or measured by the
    forward pass, checked against the plan, saved into the export; None when the plan needs none."""
    if not plan.needs_calibration:
        return None
    t = time.perf_counter()
    if req.calib_stats is not None:
        emit(progress, "calibrate", 0.0, f"reading activation stats from {req.calib_stats}")
        stats = ActivationStats.load(req.calib_stats)
    else:
        from quantgate.exporter.calibration.forward import calibrate

        emit(progress, "calibrate", 0.0, f"calibrating on {req.calib_samples} x {req.calib_seq_len} tokens")
        stats = calibrate(source, plan, data=req.calib_data, samples=req.calib_samples, seq_len=req.calib_seq_len,
                          batch_size=req.calib_batch_size, device=req.device, all_experts=req.calib_all_experts,
                          progress=progress, token=req.token, revision=req.revision, session=session)
    stats.check_covers(plan.quantized())
    stats.save(tmp / STATS_FILE_NAME)
    timings["calibrate"] = time.perf_counter() - t
    for key, meta in CALIBRATION_TIMINGS.items():   # a reused stats file's times are not this job's
        if req.calib_stats is None and isinstance(stats.metadata.get(meta), (int, float)):
            timings[key] = float(stats.metadata[meta])
    emit(progress, "calibrate", 1.0, f"activation stats for {len(stats.amax)} modules",
         warnings=list(stats.warnings), seconds=timings["calibrate"],
         **{key: timings[key] for key in CALIBRATION_TIMINGS if key in timings})
    return stats


def _from_process(process: CalibrationProcess, plan: Plan, tmp: Path, progress: ProgressCallback | None,
                  timings: dict[str, float]) -> ActivationStats:
    """The statistics of the job's calibration process (its events relayed to `progress`), checked
    against this job's plan and saved into the export."""
    stats = ActivationStats.load(process.wait(progress))
    stats.check_covers(plan.quantized())
    stats.save(tmp / STATS_FILE_NAME)
    timings.update({key: process.timings[key] for key in ("calibrate", *CALIBRATION_TIMINGS) if key in process.timings})
    timings["calibration_process_seconds"] = process.seconds   # from its start, with the CLI, to its answer
    return stats


#: Stage timings taken from the calibration metadata: timings key -> ActivationStats.metadata key.
CALIBRATION_TIMINGS: dict[str, str] = {"transformers_import_seconds": "transformers_import_seconds", "load_seconds": "load_seconds",
                                        "forward_seconds": "seconds"}


def _validate(out_dir: Path, progress: ProgressCallback | None, timings: dict[str, float],
              extra: dict[str, Any] | None = None, *, final: Path | None = None):
    """Validate the temporary `out_dir` and write the report into it. With `final` (the `--out`
    path), the report names where the export will live, not the hidden temporary directory: `final`
    when it validates, else the `<final>.failed-validation` path it is kept at."""
    from quantgate.validators.report import validate

    t = time.perf_counter()
    emit(progress, "validate", 0.0, "validating the export")
    report = validate(str(out_dir))
    if final is not None:
        report.target = str(final if report.ok else _unique(final.with_name(final.name + FAILED_SUFFIX)))
    write_report(report, out_dir, extra)
    errors = sum(1 for f in report.findings if f.severity.value == "error")
    timings["validate"] = time.perf_counter() - t
    unknown = list(report.unknown_engines)      # no prediction for these engines: said, never passed off as loads
    message = f"{errors} error finding(s)" + (f"; verdict unknown for {', '.join(unknown)}" if unknown else "")
    emit(progress, "validate", 1.0, message, ok=report.ok, errors=errors, findings=len(report.findings),
         verdicts={e: v["status"] for e, v in report.verdicts.items()}, unknown_engines=unknown,
         seconds=timings["validate"])
    return report


def write_report(report: Any, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """`quantgate-report.json` (+ `.html` when the renderer is available) next to the weights.

    `extra`: top-level keys added to the JSON report (e.g. `auto`: the achieved effective bits).
    """
    write_json_atomic(out_dir / REPORT_JSON, {**report.to_dict(), **(extra or {})}, indent=2, allow_nan=True)
    try:
        from quantgate.validators.render import render_html
    except ImportError:   # renderer not installed in this build: the JSON report is the contract
        return
    (out_dir / REPORT_HTML).write_text(render_html(report), encoding="utf-8")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (only with --overwrite) is moved aside first."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(1, 1000):
        candidate = path.with_name(f"{path.name}.{i}")
        if not candidate.exists():
            return candidate
    raise UsageError(f"too many failed exports next to {path}; remove some")
