"""Worker process entry: `python -m quantgate.service.worker JOB_SPEC.json`.

Runs one quantize job with `quantgate.exporter.pipeline.run_quantize` and speaks a line protocol on stdout,
one JSON object per line: `{"event": "progress", stage, fraction, message, data}` while it works,
then either `{"event": "result", ok, output, failed_output, validation, report, warnings}` or
`{"event": "error", code, message}`. Anything else a library prints goes to stderr (stdout is
re-pointed there), so the protocol channel stays clean. Exit status: 0 exported and validated,
1 the export failed validation, 2 bad input, 3 internal failure, 4 the server went away.

`HF_TOKEN` comes from the environment only; it is never read from the spec, printed or logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import IO, Any

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_OK", "EXIT_SERVER_GONE", "EXIT_VALIDATION_FAILED", "main"]

logger = logging.getLogger("quantgate.service.worker")

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_SERVER_GONE = 4
#: Job-spec fields of recipe "auto" passed to QuantizeRequest as they are (absent: its defaults).
AUTO_FIELDS: tuple[str, ...] = ("bits", "candidates", "method", "score_samples")


class Channel:
    """The protocol stream (a private duplicate of the original stdout)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(message, default=str) + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # Nobody reads our progress any more: the server died. Stop now instead of finishing a
            # job whose result nobody will record; the next server cleans up and requeues it.
            logger.error("the server went away (broken pipe); stopping")
            os._exit(EXIT_SERVER_GONE)

    def progress(self, event: Any) -> None:
        self.send({"event": "progress", **event.to_dict()})


def _protocol_channel() -> Channel:
    """Duplicate stdout for the protocol, then send fd 1 (and sys.stdout) to stderr."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return Channel(channel)


def request_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """The pipeline request's fields for a job spec written by the executor (torch-free)."""
    calibration = spec.get("calibration") or {}
    return {
        "source": spec["source"],
        "revision": spec.get("revision"),
        "recipe": spec["recipe"],
        "out": spec["output"],
        "dialect": spec.get("dialect", "modelopt"),
        "calib_data": calibration.get("data", "random"),
        "calib_samples": int(calibration.get("samples", 512)),
        "calib_seq_len": int(calibration.get("seq_len", 512)),
        "calib_batch_size": int(calibration.get("batch_size", 8)),
        "calib_all_experts": bool(calibration.get("all_experts", True)),
        "exclude": tuple(spec.get("exclude") or ()),
        "token": os.environ.get("HF_TOKEN") or None,
        **{key: spec[key] for key in AUTO_FIELDS if spec.get(key) is not None},
    }


def build_request(spec: dict[str, Any]) -> Any:
    """The pipeline request for a job spec written by the executor."""
    from quantgate.exporter.pipeline import QuantizeRequest

    return QuantizeRequest(**request_fields(spec))


def start_calibration(spec: dict[str, Any]) -> Any:
    """The job's calibration process (exporter.calibration.process: on a GPU, started before this
    worker imports torch), or None. It is in the worker's process group: a cancel stops both."""
    from quantgate.exporter.calibration.process import start_if_wanted

    return start_if_wanted(request_fields(spec))


def validation_summary(report: Any) -> dict[str, Any]:
    """What the job object shows about its validation: ok, verdicts and finding counts."""
    severities = [finding.severity.value for finding in report.findings]
    return {
        "ok": bool(report.ok),
        "verdicts": report.verdicts,
        "unknown_engines": list(getattr(report, "unknown_engines", [])),   # verdict `unknown`: not modelled
        "errors": severities.count("error"),
        "warnings": severities.count("warning"),
        "scheme": report.scheme,
        "dialect": report.dialect,
    }


def _write_html(report: Any, job_dir: Path, push: dict | None = None) -> None:
    from quantgate.validators.render import render_html

    page = render_html(report)
    if push is not None:
        from quantgate.exporter.publish import publish_html

        head, sep, tail = page.rpartition("</body>")
        page = f"{head}{publish_html(push)}{sep}{tail}" if sep else page + publish_html(push)
    (job_dir / "report.html").write_text(page, encoding="utf-8")


def run_job(spec: dict[str, Any], channel: Channel, calibration: Any = None) -> int:
    """Run the job (with `calibration`, a process started for it: `start_calibration`); every outcome
    is reported on `channel` and mapped to an exit status."""
    from quantgate.exporter.pipeline import run_quantize
    from quantgate.exporter.writers.preallocate import OutputSpaceError
    from quantgate.validators.errors import (
        CheckpointReadError,
        QuantgateError,
        UnsupportedArchitectureError,
        UsageError,
    )

    try:
        result = run_quantize(build_request(spec), progress=channel.progress, calibration=calibration)
    except (CheckpointReadError, UsageError, UnsupportedArchitectureError) as exc:
        channel.send({"event": "error", "code": "bad_input", "message": str(exc)})
        return EXIT_BAD_INPUT
    except OutputSpaceError as exc:   # the operator's to fix (disk or quota of the output root), not the job's
        channel.send({"event": "error", "code": "no_space", "message": str(exc)})
        return EXIT_INTERNAL
    except QuantgateError as exc:
        channel.send({"event": "error", "code": "quantgate_error", "message": str(exc)})
        return EXIT_INTERNAL
    except (MemoryError, RuntimeError) as exc:
        oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
        logger.exception("job failed")
        code = "out_of_memory" if oom else "internal_error"
        channel.send({"event": "error", "code": code, "message": f"{type(exc).__name__}: {exc}"})
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - reported to the server with its type and message
        logger.exception("job failed")
        channel.send({"event": "error", "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
        return EXIT_INTERNAL
    job_dir = Path(spec["job_dir"])
    report = {**result.report.to_dict(), **({"auto": result.auto} if result.auto else {})}
    push, push_error = _publish(spec, result, channel) if result.ok and spec.get("push_to_hub") else (None, None)
    if push is not None:
        report["publish"] = push
    _write_html(result.report, job_dir, push)
    channel.send(
        {
            "event": "result",
            "ok": bool(result.ok),
            "output": str(result.output) if result.output else None,
            "failed_output": str(result.temp_output) if result.temp_output else None,
            "validation": validation_summary(result.report),
            "report": report,
            "warnings": list(result.warnings),
        }
    )
    if push_error is not None:
        code, status = push_error
        channel.send({"event": "error", "code": code[0], "message": code[1]})
        return status
    return EXIT_OK if result.ok else EXIT_VALIDATION_FAILED


def _publish(spec: dict[str, Any], result: Any, channel: Channel) -> tuple[dict | None, Any]:
    """Push the validated export (exporter.publish, push id = the job id, so a retried job does not
    commit twice); returns (push record, None) or (None, ((code, message), exit status))."""
    from quantgate.exporter.publish import PushError, PushRejected, PushTarget, publish_export

    options = spec["push_to_hub"]
    target = PushTarget(options["repo_id"], private=bool(options.get("private")), revision=options.get("revision"))
    try:
        push, _card = publish_export(Path(result.output), target, source=spec["source"],
                                     source_revision=spec.get("revision"), recipe=spec["recipe"],
                                     push_id=spec.get("job_id"), progress=channel.progress)
    except PushRejected as exc:
        message = f"push refused: {exc}; the validated export is kept at {result.output}"
        return None, (("push_rejected", message), EXIT_BAD_INPUT)
    except PushError as exc:
        return None, (("push_failed", f"{exc} (export at {result.output})"), EXIT_INTERNAL)
    return push.to_dict(), None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    channel = _protocol_channel()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if len(args) != 1:
        channel.send(
            {
                "event": "error",
                "code": "bad_input",
                "message": "usage: python -m quantgate.service.worker JOB_SPEC.json",
            }
        )
        return EXIT_BAD_INPUT
    try:
        spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        channel.send(
            {"event": "error", "code": "bad_input", "message": f"cannot read job spec {args[0]}: {exc}"}
        )
        return EXIT_BAD_INPUT
    logger.info(
        "job %s: %s -> %s (recipe %s)",
        spec.get("job_id"),
        spec.get("source"),
        spec.get("output"),
        spec.get("recipe"),
    )
    calibration = None
    try:
        calibration = start_calibration(spec)
        from quantgate.exporter import device_warmup

        device_warmup.start("auto")   # the GPU made ready beside the pipeline's imports and the planning
        device_warmup.start_kernels()   # (imports torch and the numerics here first)
        return run_job(spec, channel, calibration)
    except Exception as exc:  # noqa: BLE001 - a bad setting, or after the pipeline (report rendering): still a clean report
        from quantgate.validators.errors import UsageError

        if isinstance(exc, UsageError):   # a switch (exporter.switches) set to nonsense
            channel.send({"event": "error", "code": "bad_input", "message": str(exc)})
            return EXIT_BAD_INPUT
        logger.exception("job failed after the export")
        channel.send({"event": "error", "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
        return EXIT_INTERNAL
    finally:
        from quantgate.exporter import device_warmup

        device_warmup.finish()   # a warm-up the job never waited for (it failed early) ends before the process
        if calibration is not None:
            calibration.close()


if __name__ == "__main__":
    sys.exit(main())
