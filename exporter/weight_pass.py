"""The weight pass: every shard streamed through a dialect writer, then the index, configs and other files.

`write_export(source, plan, stats, out_dir, ...)` picks the writer for the dialect
(exporter.writers.registry), plans the shards, produces units ahead of the writer in plan order
(exporter.unit_feed: one single-threaded worker per core on CPU, 2 on CUDA, which batches many
groups per call: exporter.writers.modelopt_batched) and writes each tensor at its planned offset
(exporter.writers.shard_plan, exporter.writers.sharding). With `deferred` it runs before calibration has produced statistics
(exporter.deferred_scales). `pipeline.run_quantize` drives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantgate.exporter import device_warmup
from quantgate.exporter.calibration.stats import STATS_FILE_NAME, ActivationStats
from quantgate.exporter.deferred_scales import DeferredInputScales
from quantgate.exporter.device_reads import device_reader
from quantgate.exporter.jsonfile import write_json_atomic
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.progress import ProgressCallback, emit
from quantgate.exporter.recipes import Plan
from quantgate.exporter.source import Source
from quantgate.exporter.switches import SettingError
from quantgate.exporter.unit_feed import UnitFeed, device_stream, feed_ahead, feed_workers
from quantgate.exporter.writers.common import CopyJob
from quantgate.exporter.writers.modelopt_batched import feed_batching
from quantgate.exporter.writers.shard_plan import DEFAULT_SHARD_SIZE, INDEX_FILE, index_for, plan_shards
from quantgate.exporter.writers.sharding import Durability, ShardWriter
from quantgate.validators.errors import UsageError

log = logging.getLogger(__name__)

REPORT_JSON = "quantgate-report.json"
REPORT_HTML = "quantgate-report.html"

#: The weight pass reports its progress each time this fraction more of the output is produced.
PROGRESS_STEP = 0.01


#: Which thread writes the produced units: "producers" (each producing thread writes what it made) or
#: "walker" (the thread walking the plan writes every unit, in plan order, while the producers go on).
WRITES_ENV = "QUANTGATE_WRITES"
WRITERS: tuple[str, ...] = ("producers", "walker")
DEFAULT_WRITES: dict[str, str] = {"cpu": "producers", "cuda": "walker"}


def writes_on(device: torch.device) -> str:
    """Who writes the weight pass's units on `device` (`WRITES_ENV` overrides the device's default).

    On a CPU every core produces (quantizing is the work), so each producer writes its own unit. On
    a GPU buffered writes into one shard file serialise on its inode lock anyway: the thread walking
    the plan takes them all, in plan order, while the producers read and quantize the next batches
    (H200: the weight pass alone 2-10 % faster in 3 of 4 paired runs, equal in the fourth; inside
    jobs within the run-to-run noise: BENCHMARKS.md, issue 11, fifth session).
    """
    chosen = os.environ.get(WRITES_ENV, "").strip().lower() or DEFAULT_WRITES.get(device.type, "producers")
    if chosen not in WRITERS:
        raise SettingError(f"{WRITES_ENV}={chosen!r}: expected one of {', '.join(WRITERS)}")
    return chosen


@dataclass
class WriteStats:
    bytes_read: int = 0
    bytes_read_in_place: int = 0      # of them, copied to the GPU from the page cache itself (exporter.device_reads)
    max_buffered_bytes: int = 0
    shards: list = field(default_factory=list)   # the shard plan written (offsets of deferred tensors)
    durability: Durability | None = None         # the shards' last fsyncs, still running: wait before publishing

    def wait_durable(self) -> float:
        """Wait until every shard is on disk (re-raises an I/O error); the seconds waited."""
        return self.durability.wait() if self.durability is not None else 0.0

    def wait_durable_quietly(self) -> None:
        """`wait_durable` on a failure path: the job fails for its own reason, not the sync's."""
        with contextlib.suppress(OSError):
            self.wait_durable()


def write_export(source: Source, plan: Plan, stats: ActivationStats | None, out_dir: Path, *,
                    shard_size: int = DEFAULT_SHARD_SIZE, device: torch.device | None = None,
                    progress: ProgressCallback | None = None, timings: dict[str, float] | None = None,
                    on_buffer: Any = None, dialect: str = "modelopt", numerics: str = DEFAULT_NUMERICS,
                    deferred: DeferredInputScales | None = None, should_stop: Any = None) -> WriteStats:
    """The weight pass: write every shard, the index, the configs and the non-weight files.

    `dialect` picks the writer (exporter.writers.registry); the streaming loop is the same for all.
    `numerics` (exporter.numerics.modes) says whose bits to reproduce: ModelOpt on CUDA or on the CPU.
    `deferred`: no statistics yet; input scales are written with a placeholder amax, checked, and
    recorded for `DeferredInputScales.patch`. `should_stop()` is called after each unit (it raises
    to abandon the pass).
    """
    from quantgate.exporter.writers.registry import writer_for

    dialect_writer = writer_for(dialect)
    t = time.perf_counter()
    device = device or torch.device("cpu")
    walker_writes = writes_on(device) == "walker"
    if not plan.quantized():
        raise UsageError(f"recipe {plan.recipe} quantizes no module of this model; nothing to export")
    write_configs = dialect_writer.prepare_configs(source, plan)   # before any weight is read: fails fast
    units = dialect_writer.build_units(source, plan)
    shards = plan_shards(units, shard_size)
    scales = deferred.scales if deferred is not None else dialect_writer.input_scales(plan, source, stats)
    total = sum(u.nbytes for u in units) or 1
    done = 0
    result = WriteStats(shards=shards)
    writer = ShardWriter(out_dir, on_buffer=on_buffer)
    if not walker_writes:   # the producing threads write: every offset is fixed before the first unit
        writer.place(shards)

    # Units are read, quantized and brought to the host ahead of this thread, in plan order, on a few
    # threads (exporter.unit_feed: one single-threaded worker per core on CPU, a few on CUDA, which
    # batch many groups per call: exporter.writers.modelopt_batched), and written at their planned
    # offsets by those threads (CPU) or by this one as it walks them in order (CUDA: `writes_on`).
    ordered = [u for shard in shards for u in shard.units]

    def compute(unit) -> dict[str, Any]:
        with device_stream(device):
            data = dialect_writer.read(unit, source, device, reader)
            job = unit.job
            if isinstance(job, CopyJob):
                return {job.name: data}
            out = dialect_writer.quantize_group(job, source, scales, device, weights=data, numerics=numerics)
            return {name: t.to("cpu") for name, t in out.items()}

    def finish(unit, tensors: dict[str, Any]) -> int:   # on the producing thread, or the walker (writes_on)
        if deferred is not None:
            deferred.produced(unit, tensors)
        return writer.write_unit(unit, tensors)

    def produce(unit) -> int:
        held = finish(unit, feed.get(unit)) if walker_writes else feed.get(unit)
        job = unit.job
        result.bytes_read += (source.info(job.name).nbytes if isinstance(job, CopyJob)
                              else sum(_weight_bytes(source, m) for m in job.modules))
        return held

    reported = -1.0

    def after(unit) -> None:
        nonlocal done, reported
        done += unit.nbytes
        if done / total - reported >= PROGRESS_STEP or done >= total:   # ~100 events, not one per unit
            reported = done / total
            emit(progress, "quantize", reported, unit.key, bytes_written=done, bytes_read=result.bytes_read)
        if should_stop is not None:
            should_stop()

    def shard_done(i: int, shard) -> None:
        emit(progress, "write", (i + 1) / len(shards), f"wrote {shard.file}", shard=shard.file,
             index=i + 1, shards=len(shards), nbytes=shard.nbytes)

    warm: dict[str, float] = {}
    ok = False
    try:
        with device_reader(device) as reader:
            batching = feed_batching(dialect, device, ordered, source, scales, numerics, reader)   # GPU: batches
            if "work_batch" in batching and not walker_writes:
                compute_batch = batching["work_batch"]
                batching["work_batch"] = lambda members: [finish(u, t) for u, t in zip(members, compute_batch(members))]
            work = compute if walker_writes else (lambda unit: finish(unit, compute(unit)))
            if device.type == "cuda":   # the GPU's first use, begun on a side thread at the job's start
                warm = device_warmup.wait()
            with UnitFeed(ordered, work, feed_workers(device), single_threaded_torch=device.type == "cpu",
                          ahead=feed_ahead(), **batching) as feed:
                if walker_writes:   # only this thread writes: the first batches are made while it places
                    feed.start()
                    writer.place(shards)
                writer.write_placed(shards, produce, after, shard_done)
        result.bytes_read_in_place = reader.registered_bytes   # page-locked in place, no host copy (CUDA only)
        ok = True
    finally:   # the feed has stopped every producing thread: no write is in flight
        if ok:   # the shards' last fsyncs go on; the caller waits for them before it publishes
            result.durability = writer.detach()
        else:
            writer.close()
    try:
        if deferred is not None:
            deferred.check_complete()
        if len(shards) > 1:
            write_json_atomic(out_dir / INDEX_FILE, index_for(shards), indent=2)
        write_configs(out_dir)   # modelopt: uniform or MIXED_PRECISION (auto); compressed-tensors: config groups
        copy_other_files(source, out_dir)
    except BaseException:
        result.wait_durable_quietly()   # no sync may still run when the caller removes the directory
        raise
    result.max_buffered_bytes = writer.max_buffered_bytes
    seconds = time.perf_counter() - t
    if timings is not None:
        timings.update(warm, weights=seconds)
    emit(progress, "write", 1.0, f"weight pass: {result.bytes_read / 1e9:.2f} GB read in {seconds:.2f} s",
         seconds=seconds, bytes_read=result.bytes_read, **warm,
         bytes_read_in_place=result.bytes_read_in_place,
         gb_per_s=result.bytes_read / 1e9 / seconds if seconds > 0 else None)
    return result


def _weight_bytes(source: Source, module) -> int:
    if module.fused is not None:
        info = source.info(module.fused.tensor)
        share = (module.fused.rows[1] - module.fused.rows[0]) / info.shape[1 if not module.fused.transposed else 2] \
            if module.fused.rows else 1.0
        return int(info.nbytes / info.shape[0] * share)
    return module.tensors["weight"].nbytes


#: Files never copied from the source: we write our own, or they describe the source's weights.
NOT_COPIED: frozenset[str] = frozenset({"config.json", "hf_quant_config.json", INDEX_FILE, REPORT_JSON,
                                        REPORT_HTML, STATS_FILE_NAME})


def copy_other_files(source: Source, out_dir: Path) -> list[str]:
    """Copy tokenizer, generation config, chat template and processor files unchanged."""
    copied = []
    for rel in source.other_files():
        if Path(rel).name in NOT_COPIED or rel.endswith(".safetensors"):
            continue
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.path / rel, dest)
        copied.append(rel)
    return copied
