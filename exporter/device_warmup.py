"""The GPU made ready on a side thread while a CUDA job's process imports and plans.

A fresh process pays for CUDA's first use in its first GPU work: the context, then each kernel the
first time it runs (kernels load lazily), the first page-locked block. In a job whose calibration
runs in its own process (exporter.calibration.process) that first work is the weight pass, whose
first batches took 0.2-0.4 s each instead of 0.01 s (H200: the context 0.2 s, the batched NVFP4
quantizer's first run 0.3 s; BENCHMARKS.md, issue 11, sixth session). `start(device)` does that
first use now, beside the job's own imports and planning:

1. torch-free, at once: the driver's primary context of the first visible GPU is created and
   retained through `libcuda` (the context torch's runtime then uses), while torch is imported;
2. after `import torch`: a stream, a page-locked block, and the batched quantizer's kernels on a
   small stack (stack, per-matrix amax, global scales, NVFP4 codes, copy back), as the weight
   pass's producing threads run them.

`wait()` (the weight pass, before its first batch) returns once that is done and says how long it
waited. A warm-up that fails only logs: the weight pass meets the same failure and reports it.
`QUANTGATE_DEVICE_WARMUP=0` turns it off; `1` or `auto` (default) warm a job that runs on CUDA.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

from quantgate.exporter.switches import OFF, switch

log = logging.getLogger(__name__)

WARMUP_ENV = "QUANTGATE_DEVICE_WARMUP"
WARM_SHAPE = (2, 128, 2048)      # [matrices, out, in]: a small stack of the weight pass's kind


class Warmup:
    """One warm-up thread: `wait()` joins it; `seconds` is how long it ran."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: float | None = None
        self.error: str | None = None
        # not a daemon: a job that ends early waits for it, so the process never exits inside a CUDA call
        self._thread = threading.Thread(target=self._run, name="quantgate-device-warmup")

    def start(self) -> Warmup:
        self._thread.start()
        return self

    def wait(self) -> float:
        t = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - t

    def _run(self) -> None:
        t = time.perf_counter()
        try:
            _retain_primary_context()
            _run_kernels(self.device)
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
    from quantgate.exporter.calibration.process import gpu_visible

    if switch(WARMUP_ENV) == OFF or not (device == "cuda" or (device == "auto" and gpu_visible())):
        return None
    with _lock:
        if _current is None:
            _current = Warmup(device).start()
        return _current


def wait() -> dict[str, float]:
    """Wait for the warm-up this process started (if any); its timings: how long the caller waited
    and how long it ran."""
    warmup = _current
    if warmup is None:
        return {}
    waited = warmup.wait()
    return {"device_warmup_wait": waited, "device_warmup": warmup.seconds or 0.0}


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


def _run_kernels(device: str) -> None:
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return
    from quantgate.exporter.numerics.nvfp4 import matrix_amax, nvfp4_global_scales, quantize_nvfp4

    cuda = torch.device("cuda")
    stream = torch.cuda.Stream(device=cuda)
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
