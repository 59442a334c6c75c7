"""Ordered, bounded, concurrent production of a weight pass's units.

`UnitFeed` computes units ahead of the consumer on a small thread pool (reads are positioned file
reads, torch kernels and positioned writes release the GIL); the consumer walks the units strictly
in plan order (progress, syncs, shard completion). In the weight pass a unit is written at its
planned offset by the thread that produced it (CPU: its `work` returns the bytes written) or by the
consumer (CUDA: `weight_pass.writes_on`). At most `workers + ahead` batches (`feed_ahead`, 1 by
default) are in flight, so memory stays bounded by a few batches whatever the model size.

CPU: one worker per available core, each running torch ops single-threaded. Quantizing is many
small element-wise kernels; splitting each one across cores costs an OpenMP barrier per kernel,
and on a loaded machine a descheduled spinning thread stalls every barrier (measured on the 2-core
box: one NVFP4 weight 10x slower with 2 intra-op threads under load than with 1). Parallelism over
units has no barriers. The process's intra-op thread count is restored when the feed closes.
CUDA: a few workers, so host reads and device-to-host copies of one unit overlap another's kernels.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Generic, TypeVar

import torch

from quantgate.exporter.switches import count

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

CUDA_WORKERS = 2          # threads producing batches for a GPU weight pass; more do
                          # not help (H200: 2/3/4 -> 3.4/4.1/3.1 s; with reads in place 2/4 -> 2.95/2.88 s)
MAX_CPU_WORKERS = 8       # quantizing is memory-bound beyond a few cores per socket


def available_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # not Linux
        return max(1, os.cpu_count() or 1)


#: Overrides the number of producing threads (tuning and benchmarks), e.g. QUANTGATE_WEIGHT_WORKERS=8.
WORKERS_ENV = "QUANTGATE_WEIGHT_WORKERS"
#: Overrides how many batches may wait, produced or queued, beyond those the workers are computing.
AHEAD_ENV = "QUANTGATE_FEED_AHEAD"
DEFAULT_AHEAD = 1


def feed_workers(device: torch.device) -> int:
    """How many units are produced at once on `device` (the consumer takes one more)."""
    override = count(WORKERS_ENV, minimum=1)
    if override is not None:
        return override
    if device.type == "cuda":
        return CUDA_WORKERS
    return min(MAX_CPU_WORKERS, available_cores())


def feed_ahead() -> int:
    """How many batches beyond the running ones may be queued or held produced (`AHEAD_ENV`)."""
    override = count(AHEAD_ENV)
    return DEFAULT_AHEAD if override is None else override


_local = threading.local()


def device_stream(device: torch.device) -> AbstractContextManager:
    """On CUDA, this thread's own stream (made once per thread), so that one worker's host-to-device
    copy and its `.item()` checks overlap other workers' kernels instead of waiting on one shared
    stream; elsewhere a no-op."""
    if device.type != "cuda":
        return nullcontext()
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device=device)
    return torch.cuda.stream(stream)


class UnitFeed(Generic[U, T]):
    """`get(unit)` returns `work(unit)`, computed ahead in plan order by `workers` threads.

    With `batches` (lists of consecutive unit indices covering every unit once) and `work_batch`
    (units -> one result each), each batch is computed by one call; a lone unit goes to `work`.
    Up to `ahead` batches beyond the `workers` running ones are queued or held produced, so the
    workers run on while the consumer is slow on a batch. Use as a context manager; `get` must be
    called in the order of `units`.
    """

    def __init__(self, units: Sequence[U], work: Callable[[U], T], workers: int, *,
                 single_threaded_torch: bool, batches: Sequence[Sequence[int]] | None = None,
                 work_batch: Callable[[list[U]], list[T]] | None = None, ahead: int = DEFAULT_AHEAD) -> None:
        self._units = list(units)
        self._position = {id(u): i for i, u in enumerate(self._units)}
        self._work = work
        self._work_batch = work_batch
        self._batches = [list(b) for b in batches] if batches is not None else [[i] for i in range(len(self._units))]
        if sorted(i for b in self._batches for i in b) != list(range(len(self._units))):
            raise ValueError("batches must cover every unit exactly once")
        self._batch_of = {i: k for k, b in enumerate(self._batches) for i in b}
        self._workers = max(1, workers)
        self._ahead = max(0, ahead)
        self._single = single_threaded_torch
        self._pending: dict[int, Future[list[T]]] = {}
        self._ready: dict[int, T] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._threads_before = torch.get_num_threads()

    def __enter__(self) -> UnitFeed[U, T]:
        init = (lambda: torch.set_num_threads(1)) if self._single else None
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="quantgate-unit",
                                        initializer=init)
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._ready.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._single:   # set_num_threads in a worker also changes the default of later threads
            torch.set_num_threads(self._threads_before)

    def _run(self, k: int) -> list[T]:
        members = [self._units[i] for i in self._batches[k]]
        if len(members) == 1 or self._work_batch is None:
            return [self._work(u) for u in members]
        return self._work_batch(members)

    def start(self) -> None:
        """Begin the first batches now, before the consumer's first `get` (it has work of its own first)."""
        self._schedule(0)

    def get(self, unit: U) -> T:
        """The result for `unit`; schedules the next batches so that `workers` stay busy."""
        i = self._position[id(unit)]
        if i in self._ready:
            return self._ready.pop(i)
        k = self._batch_of[i]
        self._schedule(k)
        results = self._pending.pop(k).result()
        self._ready.update(zip(self._batches[k], results))
        return self._ready.pop(i)

    def _schedule(self, k: int) -> None:
        """Submit batch `k` and those after it, up to `workers + ahead` in flight."""
        if self._pool is None:
            raise RuntimeError("UnitFeed used outside its `with` block")
        for ahead in range(k, min(k + self._workers + self._ahead, len(self._batches))):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._run, ahead)
