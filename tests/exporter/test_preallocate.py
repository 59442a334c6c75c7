"""Shards reserve their disk space when opened: the written file is still byte-identical to
`save_file`; a disk without room fails at once with the shard, the space and what to do (CLI exit 2,
nothing at --out); a filesystem that cannot reserve is written as before."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantgate.exporter.writers import preallocate as prealloc
from quantgate.exporter.writers.preallocate import OutputSpaceError, check_free_space
from quantgate.exporter.writers.shard_plan import OutTensor, Unit, plan_shards
from quantgate.exporter.writers.sharding import ShardWriter
from quantgate.service.cli import main


def _failing(code: int):
    """A stand-in for libc's fallocate that fails with `code` (as the C call would: -1 and errno)."""
    calls: list[tuple[int, int]] = []

    def fake(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append((offset, length))
        ctypes.set_errno(code)
        return -1

    fake.calls = calls
    return fake


def _units() -> tuple[list[Unit], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"m{i}.weight": torch.randint(0, 255, (64, 32), generator=gen, dtype=torch.uint8) for i in range(6)}
    tensors |= {f"m{i}.weight_scale_2": torch.rand((), generator=gen) for i in range(6)}
    units = [Unit(tensors=(OutTensor(f"m{i}.weight", "U8", (64, 32)), OutTensor(f"m{i}.weight_scale_2", "F32", ())),
                  job=i) for i in range(6)]
    return units, tensors


def _write(out: Path, units: list[Unit], tensors: dict[str, torch.Tensor], shard_size: int = 1 << 30) -> list:
    out.mkdir()
    shards = plan_shards(units, shard_size)
    writer = ShardWriter(out)
    writer.place(shards)
    try:
        writer.write_placed(shards, lambda u: writer.write_unit(u, {t.name: tensors[t.name] for t in u.tensors}))
    finally:
        writer.close()
    return shards


def test_a_reserved_shard_is_byte_identical_to_save_file(tmp_path: Path, monkeypatch) -> None:
    units, tensors = _units()
    sizes: list[int] = []
    real = prealloc.preallocate

    def spy(fd: int, size: int, name: str, where: Path) -> bool:
        reserved = real(fd, size, name, where)
        if reserved:   # the file has its final length before a byte of data lands in it
            assert os.fstat(fd).st_size == size
            assert os.fstat(fd).st_blocks * 512 >= size
        sizes.append(size)
        return reserved

    monkeypatch.setattr("quantgate.exporter.writers.sharding.preallocate", spy)
    shards = _write(tmp_path / "out", units, tensors)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    written = (tmp_path / "out" / shards[0].file).read_bytes()
    assert written == (tmp_path / "ref.safetensors").read_bytes()
    assert sizes == [len(written)]


@pytest.mark.skipif(prealloc._FALLOCATE is None, reason="no fallocate(2) on this platform")
def test_preallocate_reserves_blocks_and_length(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if not prealloc.preallocate(fd, 3 << 20, path.name, tmp_path):
            pytest.skip(f"{tmp_path}'s filesystem cannot reserve space")
        assert os.fstat(fd).st_size == 3 << 20
        assert os.fstat(fd).st_blocks * 512 >= 3 << 20
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(3 << 20)   # reserved, unwritten blocks read as zeros


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_no_room_for_a_shard_names_it_and_what_to_do(tmp_path: Path, monkeypatch, code: int) -> None:
    fake = _failing(code)
    monkeypatch.setattr(prealloc, "_FALLOCATE", fake)
    units, tensors = _units()
    expected = rf"no room for shard model\.safetensors \(13\.\d kB\) on the filesystem of {tmp_path}: .*elsewhere \(--out"
    with pytest.raises(OutputSpaceError, match=expected):
        _write(tmp_path / "out", units, tensors)
    assert fake.calls and fake.calls[0][0] == 0
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_a_filesystem_that_cannot_reserve_is_written_as_before(tmp_path: Path, monkeypatch, code: int) -> None:
    monkeypatch.setattr(prealloc, "_FALLOCATE", _failing(code))
    units, tensors = _units()
    shards = _write(tmp_path / "out", units, tensors, shard_size=3000)
    assert len(shards) > 1
    for shard in shards:
        part = {t.name: tensors[t.name] for u in shard.units for t in u.tensors}
        save_file(part, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert (tmp_path / "out" / shard.file).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_an_interrupted_reservation_is_retried(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def interrupted_once(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(length)
        if len(calls) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return 0

    monkeypatch.setattr(prealloc, "_FALLOCATE", interrupted_once)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert prealloc.preallocate(fd, 4096, "f", tmp_path) is True
    finally:
        os.close(fd)
    assert calls == [4096, 4096]


def test_other_failures_stay_os_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(prealloc, "_FALLOCATE", _failing(errno.EIO))
    with pytest.raises(OSError) as caught:
        prealloc.preallocate(0, 4096, "f", tmp_path)
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, OutputSpaceError)


@pytest.mark.parametrize(("nbytes", "shown"), [(3_000_000_000, "3.00 GB"), (412_500, "412.5 kB"),
                                               (2_500_000, "2.5 MB"), (999, "999 bytes")])
def test_sizes_in_messages_read_at_any_scale(nbytes: int, shown: str) -> None:
    assert prealloc._size(nbytes) == shown


def test_check_free_space(tmp_path: Path, monkeypatch) -> None:
    check_free_space(tmp_path, 1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1_500_000_000))
    with pytest.raises(OutputSpaceError, match=r"needs 2\.00 GB of shards but .* has 1\.50 GB free"):
        check_free_space(tmp_path, 2_000_000_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(total=0, used=0, free=0))
    check_free_space(tmp_path, 2_000_000_000)   # a filesystem that reports no sizes is not judged


@pytest.mark.parametrize("writes", ["producers", "walker"])   # the walker places while the first batches are made
def test_quantize_without_room_fails_before_writing_and_exits_2(tiny_model, tmp_path: Path, monkeypatch,
                                                                 capsys, writes: str) -> None:
    """The planned shards do not fit: the CLI says so (exit 2) and leaves nothing at --out or beside it."""
    monkeypatch.setenv("QUANTGATE_WRITES", writes)
    source = tiny_model("qwen3_moe")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "exports" / "o"
    code = main(["quantize", str(source), "--recipe", "nvfp4", "--calib-data", "random", "--calib-samples", "2",
                 "--calib-seq-len", "8", "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "has 1.0 kB free" in err and "elsewhere (--out" in err and "Traceback" not in err
    assert not out.exists() and not list(out.parent.iterdir())
