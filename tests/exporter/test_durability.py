"""The shards' last fsyncs run on after the weight pass: a complete shard is in place at once, the
job validates while its syncs finish, and the export is published only once every shard is on
disk; a failed sync fails the job and publishes nothing."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantgate.exporter import pipeline
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.writers import sharding
from quantgate.exporter.writers.shard_plan import OutTensor, Unit, plan_shards
from quantgate.exporter.writers.sharding import ShardWriter


def _units(n: int) -> tuple[list[Unit], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    units, tensors = [], {}
    for i in range(n):
        spec = OutTensor(f"m{i}.weight", "U8", (16, 8))
        tensors[spec.name] = torch.randint(0, 255, spec.shape, generator=gen, dtype=torch.uint8)
        units.append(Unit(tensors=(spec,), job=i))
    return units, tensors


def _slow_syncs(monkeypatch, seconds: float) -> list[float]:
    """Each shard's last fsync takes `seconds`; returns the times they ended."""
    ended: list[float] = []
    real = sharding._sync_and_close

    def slow(fd: int) -> None:
        time.sleep(seconds)
        real(fd)
        ended.append(time.perf_counter())

    monkeypatch.setattr(sharding, "_sync_and_close", slow)
    return ended


def test_a_complete_shard_is_in_place_before_its_sync_ends(tmp_path: Path, monkeypatch) -> None:
    units, tensors = _units(9)
    shards = plan_shards(units, 400)
    assert len(shards) >= 3
    ended = _slow_syncs(monkeypatch, 0.2)
    writer = ShardWriter(tmp_path)
    writer.place(shards)
    writer.write_placed(shards, lambda u: writer.write_unit(u, {t.name: tensors[t.name] for t in u.tensors}))
    durability = writer.detach()
    assert not ended, "the pass does not wait for its shards' last fsyncs"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(s.file for s in shards)
    assert not list(tmp_path.glob(".*.partial"))
    waited = durability.wait()
    assert len(ended) == len(shards) and waited > 0.1
    assert durability.wait() == waited   # once waited, done
    for shard in shards:
        save_file({t.name: tensors[t.name] for u in shard.units for t in u.tensors}, str(tmp_path / "ref"),
                  metadata={"format": "pt"})
        assert (tmp_path / shard.file).read_bytes() == (tmp_path / "ref").read_bytes()


def test_a_failed_sync_is_raised_on_every_wait(tmp_path: Path, monkeypatch) -> None:
    units, tensors = _units(3)
    shards = plan_shards(units, 10_000)
    real = os.fsync

    def failing(fd: int) -> None:
        real(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sharding.os, "fsync", failing)
    writer = ShardWriter(tmp_path)
    writer.place(shards)
    writer.write_placed(shards, lambda u: writer.write_unit(u, {t.name: tensors[t.name] for t in u.tensors}))
    durability = writer.detach()
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error"):
            durability.wait()


def test_the_job_publishes_only_after_every_shard_is_on_disk(exported, tmp_path: Path, monkeypatch) -> None:
    source, first = exported("qwen3_moe", "nvfp4")
    ended = _slow_syncs(monkeypatch, 0.5)
    published: list[float] = []
    validated: list[float] = []
    replace, validate = pipeline._replace_dir, pipeline._validate

    def timed_replace(tmp: Path, out: Path) -> None:
        published.append(time.perf_counter())
        replace(tmp, out)

    def timed_validate(*args, **kwargs):
        validated.append(time.perf_counter())
        return validate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_replace_dir", timed_replace)
    monkeypatch.setattr(pipeline, "_validate", timed_validate)
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=tmp_path / "out", device="cpu",
                          calib_stats=first.output / "calibration.json", shard_size=20_000)
    result = run_quantize(req)
    assert result.ok and len(ended) >= 2
    assert validated[0] < ended[-1] <= published[0], "validated while syncing, published after"
    assert result.timings["durable_wait"] > 0


def test_a_failed_sync_fails_the_job_and_publishes_nothing(exported, tmp_path: Path, monkeypatch) -> None:
    source, first = exported("qwen3_moe", "nvfp4")
    real = os.fsync

    def failing(fd: int) -> None:
        real(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sharding.os, "fsync", failing)
    out = tmp_path / "out"
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=out, device="cpu",
                          calib_stats=first.output / "calibration.json")
    with pytest.raises(OSError, match="Input/output error"):
        run_quantize(req)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_failure_after_the_pass_still_waits_for_its_syncs(exported, tmp_path: Path, monkeypatch) -> None:
    """The job fails for its own reason (here: copying the tokenizer files), and no sync is left
    running on a file of the directory it removes."""
    from quantgate.exporter import weight_pass

    source, first = exported("qwen3_moe", "nvfp4")
    ended = _slow_syncs(monkeypatch, 0.3)

    def broken(*args, **kwargs):
        raise RuntimeError("cannot copy tokenizer.json")

    monkeypatch.setattr(weight_pass, "copy_other_files", broken)
    out = tmp_path / "out"
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=out, device="cpu",
                          calib_stats=first.output / "calibration.json")
    with pytest.raises(RuntimeError, match="cannot copy tokenizer.json"):
        run_quantize(req)
    assert ended, "the shard's sync ended before the job failed"
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_calibration_failing_after_an_overlapped_pass_waits_for_its_syncs(tiny_model, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """Calibration on a thread beside the weight pass fails once the pass is done: the job fails with
    calibration's error, after the pass's syncs ended."""
    from quantgate.exporter.calibration.process import PROCESS_ENV
    from quantgate.exporter.overlap import OVERLAP_ENV
    from quantgate.exporter.calibration.stats import CalibrationError

    monkeypatch.setenv(OVERLAP_ENV, "1")
    monkeypatch.setenv(PROCESS_ENV, "0")
    ended = _slow_syncs(monkeypatch, 1.5)

    def failing(*args, **kwargs):
        time.sleep(0.5)
        raise CalibrationError("the forward pass ran out of memory")

    monkeypatch.setattr(pipeline, "calibration_stage", failing)
    out = tmp_path / "out"
    req = QuantizeRequest(source=str(tiny_model("qwen3_moe")), recipe="nvfp4", out=out, device="cpu",
                          calib_samples=2, calib_seq_len=8)
    with pytest.raises(CalibrationError, match="ran out of memory"):
        run_quantize(req)
    assert ended, "the pass's sync ended before the job failed"
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
