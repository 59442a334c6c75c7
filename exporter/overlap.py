"""Calibration and the weight pass at the same time.

The weight pass needs no activation statistics except for the 4-byte input scales, which are
written at their planned offsets afterwards (exporter.deferred_scales). So a job that calibrates
runs calibration (transformers' first-use imports, the model load, the forward) on a background
thread while the calling thread runs the weight pass; then the input scales are patched in, and
validation and the rename follow as before.

When: transformers' imports execute module code under the interpreter lock, and the weight pass's
producing threads need it between their reads and writes (the writes themselves, into one shard
file's page cache, bound the pass: BENCHMARKS.md "issue 11"). Started together they slow each other
(H200, issue model: weight pass 3.4 s alone, 12.6 s next to the imports); so by default the weight
pass starts once the imports are done and runs alongside the load and the forward
(`QUANTGATE_OVERLAP_START=imports`; `start` starts both at once).
Used on CUDA; on a CPU both want every core (`QUANTGATE_OVERLAP=1` forces it, `0` turns it off
everywhere). Either way the bytes are identical (tests/exporter/test_overlap.py).

Failures: whichever side fails first stops the other at its next progress point (a calibration
batch, a weight-pass unit) and its exception is raised; the background thread is always joined
before the caller cleans up, so nothing writes into a removed directory.
Timings stay honest: each side reports its own wall time, and `overlap_seconds` says how long
they ran together.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from quantgate.exporter.deferred_scales import supports
from quantgate.exporter.progress import ProgressCallback, ProgressEvent
from quantgate.exporter.switches import OFF, ON, OVERLAP_ENV, SettingError, switch

T = TypeVar("T")
W = TypeVar("W")

#: "auto" (default): overlap on the devices below; "1": always (where the dialect allows); "0": never.
OVERLAP_DEVICES: frozenset[str] = frozenset({"cuda"})


#: When the weight pass starts: "start" (with calibration) or "imports" (once transformers' imports,
#: which hold the GIL most of their time, are done).
OVERLAP_START_ENV = "QUANTGATE_OVERLAP_START"
OVERLAP_STARTS: tuple[str, ...] = ("start", "imports")
DEFAULT_OVERLAP_START = "imports"


def overlap_start() -> str:
    start = os.environ.get(OVERLAP_START_ENV, "").strip() or DEFAULT_OVERLAP_START
    if start not in OVERLAP_STARTS:
        raise SettingError(f"{OVERLAP_START_ENV}={start!r}: expected one of {', '.join(OVERLAP_STARTS)}")
    return start


def overlap_enabled(device: torch.device, dialect: str) -> bool:
    """Whether a calibrating job on `device` writing `dialect` runs both at once."""
    mode = switch(OVERLAP_ENV)
    if mode == OFF or not supports(dialect):
        return False
    return mode == ON or device.type in OVERLAP_DEVICES


class OtherSideFailed(Exception):
    """Raised inside one side when the other has failed (never escapes `run_concurrently`)."""


@dataclass
class _Side(Generic[T]):
    start: float = 0.0
    end: float = 0.0
    result: T | None = None
    error: BaseException | None = None


def locked(progress: ProgressCallback | None) -> ProgressCallback | None:
    """`progress`, called under a lock: two threads report at once (JSON lines stay whole)."""
    if progress is None:
        return None
    lock = threading.Lock()

    def call(event: ProgressEvent) -> None:
        with lock:
            progress(event)
    return call


def run_concurrently(calibrate: Callable[[ProgressCallback | None], T],
                     weight_pass: Callable[[ProgressCallback | None, Callable[[], None]], W],
                     progress: ProgressCallback | None, *,
                     ready: threading.Event | None = None,
                     on_failure: Callable[[], None] | None = None) -> tuple[T, W, dict[str, float]]:
    """Run `calibrate(progress)` on a background thread and `weight_pass(progress, check)` here
    (once `ready` is set, when given: calibration sets it). `on_failure()` is called when the weight
    pass fails, before the background thread is joined (it ends a calibration process the thread
    waits on).

    `check()` (call it between units) raises `OtherSideFailed` once calibration has failed; the
    progress `calibrate` gets raises it once the weight pass has failed. Returns both results and
    {"overlap_seconds", "calibrate_wait_seconds"}; re-raises the first failure.
    """
    progress = locked(progress)
    stop = threading.Event()
    cal: _Side[T] = _Side()
    wp: _Side[W] = _Side()

    def guarded(event: ProgressEvent) -> None:
        if stop.is_set():
            raise OtherSideFailed("the weight pass failed")
        if progress is not None:
            progress(event)

    def background() -> None:
        cal.start = time.perf_counter()
        try:
            cal.result = calibrate(guarded)
        except BaseException as exc:   # noqa: BLE001 - handed to the calling thread, re-raised there
            cal.error = exc
            stop.set()
        finally:
            cal.end = time.perf_counter()

    def check() -> None:
        if stop.is_set():
            raise OtherSideFailed("calibration failed")

    thread = threading.Thread(target=background, name="quantgate-calibrate", daemon=True)
    thread.start()
    try:
        if ready is not None:   # the weight pass waits for this (or for calibration to fail)
            while not ready.wait(0.05) and not stop.is_set():
                pass
            if stop.is_set():
                raise OtherSideFailed("calibration failed before the weight pass started")
        wp.start = time.perf_counter()
        wp.result = weight_pass(progress, check)
    except BaseException as exc:   # noqa: BLE001 - re-raised below, after the thread is joined
        wp.error = exc
        stop.set()
        if on_failure is not None:
            on_failure()
    wp.end = time.perf_counter()
    _join(thread, stop)
    waited = max(0.0, cal.end - wp.end)
    if cal.error is not None and (wp.error is None or isinstance(wp.error, OtherSideFailed)):
        raise cal.error
    if wp.error is not None:
        raise wp.error
    overlap = max(0.0, min(cal.end, wp.end) - max(cal.start, wp.start))
    return cal.result, wp.result, {"overlap_seconds": overlap, "calibrate_wait_seconds": waited}  # type: ignore[return-value]


def _join(thread: threading.Thread, stop: threading.Event) -> None:
    """Join even through a KeyboardInterrupt (the thread stops at its next progress point)."""
    interrupted: BaseException | None = None
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt as exc:
            interrupted = exc
            stop.set()
    if interrupted is not None:
        raise interrupted
