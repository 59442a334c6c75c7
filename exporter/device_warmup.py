"""The GPU made ready on a side thread while a CUDA job's process imports and plans.

A fresh process pays for CUDA's first use in its first GPU work: the context, then each kernel the
first time it runs (kernels load lazily), the first page-locked block. In a job whose calibration
runs in its own process (exporter.calibration.process) that first work is the weight pass, whose
first batches took 0.2-0.4 s each instead of 0.01 s (H200: the context 0.2 s, the batched NVFP4
quantizer's first run 0.3 s; BENCHMARKS.md, issue 11, sixth session). `start(device)` does that
first use now, beside the job's own imports and planning:

1. torch-free, at once: the driver's primary context of the first visible GPU is created and
   retained through `libcuda` (the context torch's runtime then uses), while torch is imported;
2. `import torch` beside the job's own import of it (this thread holds no other import lock then),
   a stream and a page-locked block;
3. once the job's thread has imported quantgate's numerics (`start_kernels()`: the CLI and the
   worker call it right after `start`, before importing the pipeline; `pipeline.run_quantize` too):
   the batched quantizer's kernels on a small stack (per-matrix amax, global scales, NVFP4 codes,
   copy back), as the weight pass's producing threads run them. Never imported on this thread
   first: two threads importing quantgate's numerics at once can deadlock on their module locks
   (`numerics/__init__` imports `nvfp4`); torch is safe, this thread then holds no other lock.

`wait()` (the weight pass, before its first batch) returns once that is done and says how long it
waited. A warm-up that fails only logs: the weight pass meets the same failure and reports it.
`finish()` (the CLI's and the worker's last step) ends a warm-up the job never waited for, so the
process never exits inside a CUDA call. `QUANTGATE_DEVICE_WARMUP=0` turns it off; `1` or `auto`
(default) warm a job that runs on CUDA.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any

from quantgate.exporter.switches import OFF, switch

log = logging.getLogger(__name__)

WARMUP_ENV = "QUANTGATE_DEVICE_WARMUP"
WARM_SHAPE = (2, 128, 2048)      # [matrices, out, in]: a small stack of the weight pass's kind


class Warmup:
    """One warm-up thread: `go()` lets it run the kernels, `wait()` joins it, `cancel()` skips what is
    left; `seconds` is how long it ran (from `start`, its waits included)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: float | None = None
        self.error: str | None = None
        self._go = threading.Event()        # quantgate's numerics are imported: the kernels may run
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="quantgate-device-warmup", daemon=True)

    def start(self) -> Warmup:
        self._thread.start()
        return self

    def go(self) -> None:
        self._go.set()

    def cancel(self) -> None:
        self._cancelled = True
        self._go.set()

    def wait(self) -> float:
        t = time.perf_counter()
        self._go.set()
        self._thread.join()
        return time.perf_counter() - t

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            _retain_primary_context()
            stream = _prepare(self.device)
            self._go.wait()
            if stream is not None and not self._cancelled:
                _run_kernels(stream)
        except Exception as exc:   # noqa: BLE001 - a warm-up never fails the job; the pass reports its own errors
            self.error = f"{type(exc).__name__}: {exc}"
            log.debug("device warm-up failed: %s", self.error)
        self.seconds = time.perf_counter() - t


_current: Warmup | None = None
_lock = threading.Lock()


def start(device: str) -> Warmup | None:
    """Start warming the GPU for a job on `device` ("cuda", or "auto" where a GPU is visible: torch-free
    test); None where there is nothing to warm. Once per process."""
    global _current
    from quantgate.exporter.calibration import process

    if switch(WARMUP_ENV) == OFF or not process.runs_on_cuda(device):
        return None
    with _lock:
        if _current is None:
            _current = Warmup(device).start()
        return _current


def start_kernels() -> None:
    """Import quantgate's numerics on the calling thread (and with them torch), then let the warm-up
    run the quantizer's kernels, beside whatever the caller imports next."""
    if _current is not None:
        import quantgate.exporter.numerics.nvfp4  # noqa: F401 - imported on this thread, run on the warm-up's

        _current.go()


def wait() -> dict[str, float]:
    """Wait for the warm-up this process started (if any); its timings: how long the caller waited
    and how long it ran."""
    warmup = _current
    if warmup is None:
        return {}
    waited = warmup.wait()
    return {"device_warmup_wait": waited, "device_warmup": warmup.seconds or 0.0}


def finish() -> None:
    """End this process's warm-up: what it has not begun is skipped, what runs is waited for."""
    if _current is not None:
        _current.cancel()
        _current.wait()


def _retain_primary_context() -> None:
    """Create the first visible GPU's primary context through the driver (ctypes releases the GIL,
    so torch's import goes on meanwhile); torch's runtime finds it made."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return                                  # no driver library: torch will say what is wrong
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)   # held for the process's life


def _prepare(device: str) -> Any:
    """torch's side of the context, a stream and a page-locked block; the stream, or None where
    `--device auto` finds no GPU."""
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return None
    stream = torch.cuda.Stream(device=torch.device("cuda"))
    torch.empty(WARM_SHAPE[1:], dtype=torch.bfloat16, pin_memory=True)
    return stream


def _run_kernels(stream: Any) -> None:
    import torch

    from quantgate.exporter.numerics.nvfp4 import matrix_amax, nvfp4_global_scales, quantize_nvfp4

    cuda = stream.device
    with torch.cuda.stream(stream):
        weights = torch.linspace(-1.0, 1.0, WARM_SHAPE[1] * WARM_SHAPE[2], device=cuda) \
            .reshape(WARM_SHAPE[1:]).to(torch.bfloat16)
        stack = torch.stack([weights] * WARM_SHAPE[0])                                  # [B, out, in]
        amax = matrix_amax(stack)                                                        # fp32 [B]
        amax.cpu()
        packed, block, _ = quantize_nvfp4(stack, nvfp4_global_scales(amax))             # [B, out, in/2], [B, out, in/16]
        for out in (packed, block.view(torch.uint8)):
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
        stream.synchronize()
