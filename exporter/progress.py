"""Progress events of a quantize job, and the sinks that show them.

The pipeline reports `ProgressEvent`s through a plain callback. The CLI turns them into a bar on a
terminal (stderr) or into JSON lines (`--progress json`, what the service's worker relays); the
library never prints. Stages, in order: plan, calibrate, quantize, write, validate, finalize.
Each stage's last event carries `seconds` (the calibrate one also `transformers_import_seconds`
for its first-use imports, `load_seconds` and `forward_seconds`; the weight pass `gb_per_s`),
and the finalize event all of them as `timings`; the CLI adds `import_seconds` (process start to
the pipeline imported) to its first event. Where the weight pass runs alongside calibration
(exporter.overlap), their events interleave and a last `write` event gives `overlap_seconds`; where
calibration runs in its own process (exporter.calibration.process) its events are relayed, the first
calibrate event names its `pid`, and the timings add `calibration_process_seconds`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TextIO

STAGES: tuple[str, ...] = ("plan", "calibrate", "quantize", "write", "validate", "finalize")


@dataclass
class ProgressEvent:
    """One progress report.

    `fraction` is the completed fraction of `stage` in [0, 1], or None when unknown; `data` carries
    machine-readable detail (bytes read, shard index, finding counts ...).
    """

    stage: str
    fraction: float | None
    message: str
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


def process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere), to time interpreter and
    import costs that happen before any of our code runs."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def emit(progress: ProgressCallback | None, stage: str, fraction: float | None, message: str, **data: object) -> None:
    """Send one event if anyone listens (the pipeline's single reporting entry point)."""
    if progress is not None:
        progress(ProgressEvent(stage, None if fraction is None else min(max(fraction, 0.0), 1.0), message, dict(data)))


class JsonLinesProgress:
    """Writes each event as one JSON object per line (`{"event": "progress", ...}`), flushed at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: ProgressEvent) -> None:
        self.stream.write(json.dumps({"event": "progress", **event.to_dict()}, default=str) + "\n")
        self.stream.flush()


BAR_WIDTH = 28
MIN_REDRAW_S = 0.1


class BarProgress:
    """A one-line progress bar redrawn in place on a terminal (`\\r`), one line kept per finished stage."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._stage: str | None = None
        self._stage_done = True
        self._last_draw = 0.0
        self._started = time.monotonic()

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.stage != self._stage:
            # a finished stage keeps its line; two stages reporting at once (calibration alongside
            # the weight pass: exporter.overlap) share the line in hand instead of one line per event
            if self._stage is not None and self._stage_done:
                self.stream.write("\n")
            self._stage = event.stage
        elif now - self._last_draw < MIN_REDRAW_S and (event.fraction or 0.0) < 1.0:
            return
        self._last_draw = now
        fraction = event.fraction
        if fraction is None:
            bar = "." * BAR_WIDTH
            pct = "  ?%"
        else:
            filled = round(fraction * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            pct = f"{fraction * 100:3.0f}%"
        elapsed = now - self._started
        line = f"\r{event.stage:<9} [{bar}] {pct} {elapsed:6.1f}s  {event.message[:70]}"
        self.stream.write(line.ljust(120))
        self.stream.flush()
        self._stage_done = fraction is not None and fraction >= 1.0

    def close(self) -> None:
        if self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._stage = None
