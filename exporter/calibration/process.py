"""Calibration in its own process, started with a GPU quantize job before the job imports torch.

The longest stage of a GPU job is not ours: transformers' first-use imports (6-10 s on the H200
machine), then the model load and the forward. In one process the weight pass can only run beside
the load and the forward, because the imports hold the interpreter lock most of their time
(exporter.overlap; BENCHMARKS.md, issue 11). Here `quantgate quantize` starts a calibration process
first thing: it imports torch and transformers, loads the model and calibrates, while the job's own
process imports, plans and runs the whole weight pass; the job then writes the input scales from the
statistics the process hands back (exporter.deferred_scales). The export's bytes are the same as in
one process (tests/exporter/test_calibration_process.py).

`QUANTGATE_CALIBRATION_PROCESS`: `auto` (default) starts one for a job on a GPU that calibrates and
overlaps (`quantgate quantize`, and the service's worker, a fresh process per job); `1` for any
device (tests); `0` never.

Protocol: the request goes to the process as one JSON line on its stdin, which then stays open; its
end means the job's process is gone, and the calibration process exits. The process answers on
stdout with JSON lines: progress events, then one result (the statistics file it wrote and its
timings) or one error (a domain error is raised again in the job as the same class, with the same
message). Its stderr is the job's. A process that ends without an answer (killed, out of memory) is
a `CalibrationError` that says how it ended; a job that fails or is interrupted kills the process.
Module level imports the standard library only: the job starts the process before importing torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROCESS_ENV = "QUANTGATE_CALIBRATION_PROCESS"
#: what the calibration process gets of the job's request (the token stays in the environment)
REQUEST_FIELDS: tuple[str, ...] = ("source", "revision", "recipe", "dialect", "exclude", "calib_data",
                                   "calib_samples", "calib_seq_len", "calib_batch_size", "calib_all_experts",
                                   "device", "numerics")
STATS_FILE = "calibration.json"
NVIDIA_CONTROL = Path("/dev/nvidiactl")   # present where an NVIDIA driver is loaded: `--device auto` may pick CUDA


def wanted(fields: Mapping[str, Any]) -> bool:
    """Whether a job with these request fields should calibrate in its own process (torch-free)."""
    from quantgate.exporter.recipes import get_recipe
    from quantgate.exporter.schemes import get_scheme
    from quantgate.exporter.switches import OFF, ON, OVERLAP_ENV, switch
    from quantgate.validators.errors import QuantgateError

    mode = switch(PROCESS_ENV)
    if mode == OFF or switch(OVERLAP_ENV) == OFF:
        return False
    if fields.get("calib_stats") is not None:
        return False
    try:
        if not get_scheme(get_recipe(fields["recipe"]).scheme_name).calibrates:   # weight-only recipes, "auto"
            return False
    except QuantgateError:
        return False                  # an unknown recipe: the job says so itself
    return mode == ON or runs_on_cuda(fields.get("device", "auto"))


def runs_on_cuda(device: str) -> bool:
    """Whether a job asked for `device` ("cuda", "auto" or "cpu") runs on a GPU (torch-free)."""
    return device == "cuda" or (device == "auto" and gpu_visible())


def gpu_visible() -> bool:
    """Whether `--device auto` may pick CUDA here, without importing torch: a driver is loaded and
    `CUDA_VISIBLE_DEVICES` (the service's CPU slots set it empty) does not hide every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return NVIDIA_CONTROL.exists()


def start_if_wanted(fields: Mapping[str, Any]) -> CalibrationProcess | None:
    """The job's calibration process, started now where `wanted`; None where the job calibrates in
    its own process (also when no process can be started: the job goes on, with a warning)."""
    if not wanted(fields):
        return None
    try:
        return CalibrationProcess.start(fields)
    except OSError as exc:
        log.warning("calibrating in the job's own process: cannot start one (%s)", exc)
        return None


class CalibrationProcess:
    """A running calibration process; `wait(progress)` relays its events and returns its statistics file."""

    def __init__(self, proc: subprocess.Popen, workdir: Path, started: float) -> None:
        self.proc = proc
        self.workdir = workdir
        self.started = started
        self.seconds = 0.0                    # from start to its answer
        self.timings: dict[str, float] = {}   # the process's own stage timings
        self._lock = threading.Lock()

    @classmethod
    def start(cls, fields: Mapping[str, Any]) -> CalibrationProcess:
        workdir = Path(tempfile.mkdtemp(prefix="quantgate-calibration-"))
        request = {key: fields[key] for key in REQUEST_FIELDS if key in fields}
        request["exclude"] = list(request.get("exclude") or ())
        request["stats"] = str(workdir / STATS_FILE)
        proc = subprocess.Popen([sys.executable, "-m", "quantgate.exporter.calibration.process"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        return cls(proc, workdir, time.perf_counter())

    def wait(self, progress: Callable[[Any], None] | None) -> Path:
        """Relay the process's progress events to `progress` until it answers; the statistics file,
        or the process's error raised here. An exception from `progress` kills the process."""
        from quantgate.exporter.calibration.stats import CalibrationError
        from quantgate.exporter.progress import ProgressEvent

        try:
            for line in self.proc.stdout:
                message = json.loads(line)
                if "event" in message and progress is not None:
                    progress(ProgressEvent(**message["event"]))
                elif "result" in message:
                    self.seconds = time.perf_counter() - self.started
                    self.timings = dict(message["result"]["timings"])
                    return Path(message["result"]["stats"])
                elif "error" in message:
                    raise _domain_error(message["error"])
        except BaseException:
            self.kill()
            raise
        code = self.proc.wait()
        raise CalibrationError(f"the calibration process ended without an answer ({_how(code)}); "
                               "its messages are above; rerun with QUANTGATE_CALIBRATION_PROCESS=0 to calibrate "
                               "in the job's own process")

    def kill(self) -> None:
        """End the process now (the job failed or no longer needs it)."""
        with self._lock:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kill the process if it still runs, and remove its working directory."""
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):   # a broken pipe to a process already gone
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def _how(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = ": out of memory? check the kernel log" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _domain_error(error: Mapping[str, str]) -> BaseException:
    """The process's error as the same quantgate domain error class, else a CalibrationError."""
    from quantgate.exporter.calibration.stats import CalibrationError
    from quantgate.validators.errors import QuantgateError

    module, name, message = error.get("module", ""), error.get("type", ""), error.get("message", "")
    if module.startswith("quantgate."):
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, QuantgateError):
            return cls(message)
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    return CalibrationError(f"calibration failed in its process: {name}: {message} (its traceback is above)")


# ------------------------------------------------------------------------------------ the process
def _exit_when_the_job_goes() -> None:
    sys.stdin.read()        # returns at end of input: the job's process has closed it, or is gone
    os._exit(3)


def child_main() -> int:
    """The calibration process: read the request, calibrate, answer on the original stdout."""
    line = sys.stdin.readline()
    threading.Thread(target=_exit_when_the_job_goes, name="quantgate-job-watch", daemon=True).start()
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())    # whatever else prints goes to stderr, not the answer
    lock = threading.Lock()

    def send(message: dict) -> None:
        with lock:
            answer.write(json.dumps(message, default=str, allow_nan=True) + "\n")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        request = json.loads(line)
        timings = _calibrate(request, lambda event: send({"event": event.to_dict()}))
        send({"result": {"stats": request["stats"], "timings": timings}})
        code = 0
    except BaseException as exc:   # noqa: BLE001 - every failure is answered, then the process ends
        from quantgate.validators.errors import QuantgateError

        if not isinstance(exc, (QuantgateError, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
        send({"error": {"module": type(exc).__module__, "type": type(exc).__qualname__, "message": str(exc)}})
        code = 1
    answer.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter teardown (the CUDA context's alone took 1.5 s): the answer is out


def _calibrate(request: dict, progress: Callable[[Any], None]) -> dict[str, float]:
    """What the job's own process would do to calibrate (pipeline.calibration_stage), from the request."""
    from quantgate.exporter.calibration.session import ModelSession
    from quantgate.exporter.pipeline import QuantizeRequest, calibration_stage
    from quantgate.exporter.recipes import make_plan
    from quantgate.exporter.source import open_source

    fields = dict(request)
    stats = Path(fields.pop("stats"))
    req = QuantizeRequest(**fields, out=stats.parent)
    session = ModelSession(req.source, device=req.device, revision=req.revision)
    session.import_transformers()   # first: the longest stage, and independent of the source
    source = open_source(req.source, revision=req.revision, refuse_quantized=True)
    session.model_ref = str(source.path)
    plan = make_plan(source.layout, req.recipe, req.exclude, dialect=req.dialect)
    timings: dict[str, float] = {}
    calibration_stage(req, source, plan, stats.parent, progress, timings, session)
    return timings


if __name__ == "__main__":
    child_main()
