"""Source reads without a host copy (exporter.device_reads) and the batched reads that use them.

The page-locking calls are CUDA's; here a recording stand-in for the CUDA runtime takes their place on
the CPU, so the page arithmetic, the mapping, the partial pages at either end, the fallback after a
refused registration and the coalescing are checked on any machine. With CUDA the real runtime is used.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from quantgate.exporter import device_reads
from quantgate.exporter.calibration.stats import ActivationStats
from quantgate.exporter.device_reads import MIN_REGISTERED, PAGE, DeviceReader
from quantgate.exporter.recipes import make_plan
from quantgate.exporter.source import open_source
from quantgate.exporter.writers import common, modelopt
from quantgate.exporter.writers.common import read_group, read_groups
from quantgate.exporter.writers.modelopt_batched import batchable

CPU = torch.device("cpu")


class FakeCudart:
    """Records registrations; refuses a page registered twice at once (as CUDA does), or everything."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.live: dict[int, int] = {}
        self.calls: list[tuple[int, int, int]] = []
        self.cleared = 0
        self.overlaps = 0
        self.lock = threading.Lock()

    def cudaHostRegister(self, address, size, flags) -> int:
        a, n = address.value, size.value
        with self.lock:
            self.calls.append((a, n, flags.value))
            if self.refuse:
                return 801                     # cudaErrorNotSupported
            if any(a < b + m and b < a + n for b, m in self.live.items()):
                self.overlaps += 1
                return device_reads.ALREADY_REGISTERED
            self.live[a] = n
        return 0

    def cudaHostUnregister(self, address) -> int:
        with self.lock:
            del self.live[address.value]
        return 0

    def cudaGetLastError(self) -> int:
        self.cleared += 1
        return 0


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * MIN_REGISTERED + 5 * PAGE + 123)
    path = tmp_path / "blob.safetensors"
    path.write_bytes(data)
    return path, data


def _reader(fake: FakeCudart) -> DeviceReader:
    reader = DeviceReader(CPU)
    reader._cudart = fake
    return reader


# (offset, length): aligned, unaligned at both ends, ending at the file's end, shorter than MIN_REGISTERED
SPANS = [(0, 2 * MIN_REGISTERED), (PAGE + 7, MIN_REGISTERED + 3 * PAGE), (123, 3 * MIN_REGISTERED + 5 * PAGE),
         (5, MIN_REGISTERED // 2)]


@pytest.mark.parametrize(("offset", "length"), SPANS)
def test_reads_equal_the_file_and_register_only_whole_pages_inside_the_span(blob, offset, length) -> None:
    path, data = blob
    fake = FakeCudart()
    reader = _reader(fake)
    try:
        got = reader.read(path, offset, length)
    finally:
        reader.close()
    assert bytes(got.numpy()) == data[offset:offset + length]
    assert fake.live == {}                                         # every registration undone
    base = None
    for address, size, flags in fake.calls:
        assert flags == device_reads.HOST_REGISTER_READ_ONLY
        assert size % PAGE == 0 and size >= MIN_REGISTERED
        base = address - (-(-offset // PAGE) * PAGE)                # the mapping's start
        assert base % PAGE == 0
    registered = sum(size for _, size, _ in fake.calls)
    assert reader.registered_bytes == registered and reader.buffered_bytes == length - registered
    if length < MIN_REGISTERED:
        assert not fake.calls
    else:
        assert len(fake.calls) == 1 and length - registered < 2 * PAGE


@pytest.mark.parametrize("copies", [1, 2])
def test_spans_read_at_once_never_register_a_page_twice(blob, copies: int) -> None:
    """Adjacent spans share partial pages that neither registers; the same span read twice at once
    (never in a weight pass) is refused by CUDA for one of them, which then reads through a buffer."""
    path, data = blob
    fake = FakeCudart()
    reader = _reader(fake)
    step = MIN_REGISTERED + 1001                   # span borders fall inside pages
    spans = [(o, min(step, len(data) - o)) for o in range(0, len(data), step)]
    results: dict[int, bytes] = {}

    def read(span: tuple[int, int]) -> None:
        results[span[0]] = bytes(reader.read(path, *span).numpy())

    threads = [threading.Thread(target=read, args=(s,)) for s in spans for _ in range(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert b"".join(results[o] for o, _ in spans) == data
    assert fake.live == {}
    if copies == 1:
        assert fake.overlaps == 0
    assert reader._cudart is fake                  # an overlap does not turn page-locking off


def test_a_refused_registration_falls_back_once_with_a_warning(blob, caplog) -> None:
    path, data = blob
    fake = FakeCudart(refuse=True)
    reader = _reader(fake)
    with caplog.at_level(logging.WARNING, logger="quantgate.exporter.device_reads"):
        first = reader.read(path, 0, 2 * MIN_REGISTERED)
        second = reader.read(path, 17, 2 * MIN_REGISTERED)
    reader.close()
    assert bytes(first.numpy()) == data[:2 * MIN_REGISTERED]
    assert bytes(second.numpy()) == data[17:17 + 2 * MIN_REGISTERED]
    assert len(fake.calls) == 1 and fake.cleared == 1              # tried once; the runtime's error cleared
    assert reader.registered_bytes == 0
    warnings = [r for r in caplog.records if "cannot page-lock" in r.getMessage()]
    assert len(warnings) == 1 and "801" in warnings[0].getMessage()


def test_without_a_cuda_runtime_every_read_is_buffered(blob) -> None:
    path, data = blob
    reader = DeviceReader(CPU)                     # a CPU reader never looks for the CUDA runtime
    assert reader._cudart is None
    got = reader.read(path, 3, 2 * MIN_REGISTERED)
    reader.close()
    assert bytes(got.numpy()) == data[3:3 + 2 * MIN_REGISTERED]
    assert reader.registered_bytes == 0


@pytest.mark.parametrize("arch", ["gemma4", "qwen3_moe", "llama"])
def test_coalesced_group_reads_equal_one_group_at_a_time(exported, monkeypatch, arch: str) -> None:
    source_dir, _ = exported(arch, "nvfp4")
    source = open_source(str(source_dir))
    plan = make_plan(source.layout, "nvfp4")
    jobs = [u.job for u in modelopt.build_units(source, plan) if batchable(u)]
    monkeypatch.setattr(common, "MAX_COALESCED", 40_000)            # several runs, some split mid-layer
    reads: list[int] = []
    reader = DeviceReader(CPU)
    real = reader.read
    reader.read = lambda path, offset, length: (reads.append(length), real(path, offset, length))[1]  # type: ignore[method-assign]
    try:
        together = read_groups(jobs, source, reader)
    finally:
        reader.close()
    spans = {(m.fused.tensor, m.fused.expert) if m.fused else (m.tensors["weight"].name, None)
             for j in jobs for m in j.modules}
    assert len(reads) < len(spans)                                     # adjacent spans were coalesced
    assert max(reads) <= max(40_000, max(source.span(*s)[2] for s in spans))    # a run never passes the cap
    for job, got in zip(jobs, together):
        want = read_group(job, source, CPU)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real page-locking calls")
def test_on_cuda_the_source_is_copied_from_the_page_cache_itself(blob) -> None:
    path, data = blob
    reader = DeviceReader(torch.device("cuda"))
    try:
        got = reader.read(path, 123, 3 * MIN_REGISTERED)
    finally:
        reader.close()
    assert bytes(got.cpu().numpy()) == data[123:123 + 3 * MIN_REGISTERED]
    assert reader.registered_bytes >= 2 * MIN_REGISTERED


def test_batched_export_reports_reads_in_place(exported, tmp_path: Path, monkeypatch) -> None:
    """The weight pass's progress says how many bytes were read in place (0 on the CPU)."""
    from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
    from quantgate.exporter.writers import modelopt_batched

    source_dir, first = exported("gemma4", "nvfp4")
    monkeypatch.setattr(modelopt_batched, "BATCH_DEVICES", frozenset({"cpu"}))
    events: list = []
    result = run_quantize(QuantizeRequest(source=str(source_dir), recipe="nvfp4", out=tmp_path / "o", device="cpu",
                                          calib_stats=first.output / "calibration.json"), events.append)
    assert result.ok
    done = [e for e in events if e.stage == "write" and "bytes_read_in_place" in e.data]
    assert len(done) == 1 and done[0].data["bytes_read_in_place"] == 0 and done[0].data["bytes_read"] > 0
    ActivationStats.load(result.output / "calibration.json")


def test_a_file_shorter_than_its_header_says_is_a_clear_error(blob) -> None:
    from quantgate.validators.errors import CheckpointReadError

    path, data = blob
    reader = DeviceReader(CPU)
    try:
        with pytest.raises(CheckpointReadError, match="truncated"):
            reader.read(path, len(data) - 10, 100)
    finally:
        reader.close()


def test_a_file_that_cannot_be_mapped_is_read_through_buffers(blob, caplog) -> None:
    path, data = blob
    fake = FakeCudart()
    reader = _reader(fake)

    class NoMmap:
        """libc whose mmap fails as it does on filesystems without mapping support."""

        @staticmethod
        def mmap(*args) -> int:
            ctypes.set_errno(19)                     # ENODEV
            return device_reads._MAP_FAILED

        @staticmethod
        def munmap(*args) -> int:
            raise AssertionError("nothing was mapped")

    reader._libc = NoMmap()
    with caplog.at_level(logging.WARNING, logger="quantgate.exporter.device_reads"):
        got = reader.read(path, 11, 2 * MIN_REGISTERED)
        again = reader.read(path, 0, 2 * MIN_REGISTERED)
    reader.close()
    assert bytes(got.numpy()) == data[11:11 + 2 * MIN_REGISTERED] and bytes(again.numpy()) == data[:2 * MIN_REGISTERED]
    assert fake.calls == [] and reader.registered_bytes == 0
    expected = ("weight pass: cannot page-lock the source in place (cannot map blob.safetensors: No such device); "
                "reading through page-locked buffers")
    assert [r.getMessage() for r in caplog.records if "cannot map" in r.getMessage()] == [expected]


@pytest.mark.parametrize(("arch", "recipe", "dialect"), [("qwen3_moe", "fp8", "modelopt"),
                                                         ("gemma4", "fp8", "compressed-tensors"),
                                                         ("mixtral", "nvfp4", "modelopt")])
def test_a_dialect_writer_reads_the_same_weights_through_a_reader(exported, arch, recipe, dialect) -> None:
    """The per-unit GPU path (every dialect that does not batch) reads through the reader on CUDA."""
    from quantgate.exporter.writers.common import QuantJob
    from quantgate.exporter.writers.registry import writer_for

    source_dir, _ = exported(arch, recipe)
    source = open_source(str(source_dir))
    writer = writer_for(dialect)
    units = [u for u in writer.build_units(source, make_plan(source.layout, recipe)) if isinstance(u.job, QuantJob)]
    assert units
    reader = DeviceReader(CPU)
    try:
        for unit in units:
            got, want = writer.read(unit, source, CPU, reader), writer.read(unit, source, CPU)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), unit.key
    finally:
        reader.close()


def test_torchs_own_cuda_runtime_is_preferred() -> None:
    paths = {"/x/cupy/libcudart.so.12", "/y/nvidia/cu13/lib/libcudart.so.13"}
    assert device_reads.runtimes_first(paths, "13.0")[0] == "/y/nvidia/cu13/lib/libcudart.so.13"
    assert device_reads.runtimes_first(paths, "12.8")[0] == "/x/cupy/libcudart.so.12"
    assert device_reads.runtimes_first(paths, None) == sorted(paths)


class RecordingLibc:
    """The real libc, with each madvise call recorded (and optionally refused, as before Linux 5.14)."""

    def __init__(self, refuse: bool = False) -> None:
        self.real = device_reads._libc()
        self.refuse = refuse
        self.advised: list[tuple[int, int, int]] = []

    def madvise(self, address, length, advice) -> int:
        self.advised.append((address.value, length.value, advice))
        if self.refuse:
            ctypes.set_errno(22)                     # EINVAL: an advice this kernel does not know
            return -1
        return self.real.madvise(address, length, advice)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("refuse", [False, True])
def test_prefaulting_the_source_runs_ahead_on_a_side_thread(blob, monkeypatch, refuse: bool) -> None:
    """With `QUANTGATE_PREFAULT=1` a mapped file is faulted in from its start in steps on a side
    thread; a kernel that refuses the advice stops it after one call; the reads are the same bytes."""
    path, data = blob
    monkeypatch.setenv(device_reads.PREFAULT_ENV, "1")
    monkeypatch.setattr(device_reads, "PREFAULT_STEP", MIN_REGISTERED)
    libc = RecordingLibc(refuse)
    monkeypatch.setattr(device_reads, "_cudart", lambda: FakeCudart())
    monkeypatch.setattr(device_reads, "_libc", lambda: libc)
    reader = DeviceReader(torch.device("cuda") if torch.cuda.is_available() else CPU)
    if reader._cudart is None:   # a CPU reader never page-locks: give it the stand-in, as _reader does
        reader._cudart = FakeCudart()
        reader._prefault = True
    try:
        got = reader.read(path, 123, 3 * MIN_REGISTERED)
        if not refuse:
            _until(lambda: len(libc.advised) == 4)
    finally:
        reader.close()                               # joins the side thread before unmapping
    assert bytes(got.cpu().numpy()) == data[123:123 + 3 * MIN_REGISTERED]
    starts = [a for a, _, _ in libc.advised]
    assert {advice for _, _, advice in libc.advised} == {device_reads.MADV_POPULATE_READ}
    if refuse:
        assert len(libc.advised) == 1
    else:   # every step of the file, in order, the last one short
        assert [n for _, n, _ in libc.advised] == [MIN_REGISTERED] * 3 + [len(data) - 3 * MIN_REGISTERED]
        assert starts == sorted(starts) and starts[1] - starts[0] == MIN_REGISTERED


@pytest.mark.parametrize(("env", "cudart", "expected"), [(None, True, True), ("0", True, False), ("off", True, False),
                                                         (None, False, False)])
def test_prefaulting_is_on_where_the_source_is_page_locked(monkeypatch, env, cudart: bool, expected: bool) -> None:
    """On by default wherever the reader page-locks in place; `QUANTGATE_PREFAULT=0` turns it off."""
    if env is None:
        monkeypatch.delenv(device_reads.PREFAULT_ENV, raising=False)
    else:
        monkeypatch.setenv(device_reads.PREFAULT_ENV, env)
    monkeypatch.setattr(device_reads, "_cudart", (lambda: FakeCudart()) if cudart else (lambda: None))
    reader = DeviceReader(torch.device("cuda"))
    reader.close()
    assert reader._prefault is expected


def _until(condition, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_prefaulting_stays_a_bounded_distance_ahead_of_the_reads(tmp_path: Path, monkeypatch) -> None:
    """At most PREFAULT_AHEAD beyond the furthest read of a file (a cold file larger than memory is
    not read far ahead of its readers), and a file the readers have left is not prefaulted further."""
    step = MIN_REGISTERED
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (first, second):
        path.write_bytes(os.urandom(8 * step))
    libc = RecordingLibc()
    monkeypatch.setenv(device_reads.PREFAULT_ENV, "1")
    monkeypatch.setattr(device_reads, "PREFAULT_STEP", step)
    monkeypatch.setattr(device_reads, "PREFAULT_AHEAD", 2 * step)
    reader = _reader(FakeCudart())
    reader._libc, reader._prefault = libc, True
    try:
        reader.read(first, 0, step)                  # read to 1 step: faulted in up to 1 + 2 steps
        _until(lambda: len(libc.advised) == 3)
        base = reader._maps[first][0]
        assert [a - base for a, _, _ in libc.advised] == [0, step, 2 * step]
        reader.read(first, 2 * step, 2 * step)       # read to 4 steps: up to 6
        _until(lambda: len(libc.advised) == 6)
        reader.read(second, 0, step)                 # the readers moved on: the first file is left
        _until(lambda: any(a == reader._maps[second][0] for a, _, _ in libc.advised))
    finally:
        reader.close()                               # wakes a waiting side thread
    assert len([a for a, _, _ in libc.advised if base <= a < base + 8 * step]) == 6
