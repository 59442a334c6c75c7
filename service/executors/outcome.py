"""What a finished worker run means for its job: a pure function of the exit status, the worker's
final `result` / `error` events and its stderr tail.

Worker exit codes (service/worker.py): 0 exported and validated, 1 export failed validation,
2 bad input (unreadable source, unknown recipe ...), 3+ internal failure; negative = killed by a
signal. A job is `succeeded` only with exit 0 *and* a result event that says ok.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from quantgate.service.executors.process import describe_exit
from quantgate.service.worker import EXIT_BAD_INPUT, EXIT_OK, EXIT_VALIDATION_FAILED

__all__ = ["Outcome", "interpret"]

STDERR_LINES_IN_MESSAGE = 5

# exit status without an error event -> (error code, what it means); status 1 counts as a failed
# validation only with its result event (an uncaught Python exception also exits 1), and signals
# and unknown codes fall through to "worker_crashed"
EXIT_MEANINGS: dict[int, tuple[str, str]] = {
    EXIT_BAD_INPUT: ("bad_input", "the job's input was rejected"),
}


@dataclass(frozen=True)
class Outcome:
    """The terminal state a run asks for (the executor may still turn it into `cancelled`)."""

    status: str  # succeeded | failed
    message: str
    error_code: str | None = None
    error_message: str | None = None
    output: str | None = None  # final output path (succeeded)
    failed_output: str | None = None  # export kept for inspection after failing validation
    validation: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    report_html: str | None = None
    warnings: list[str] = field(default_factory=list)


def _tail(stderr_tail: Sequence[str]) -> str:
    lines = [line for line in stderr_tail if line.strip()][-STDERR_LINES_IN_MESSAGE:]
    return ("; stderr: " + " | ".join(lines)) if lines else ""


def interpret(
    returncode: int,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    stderr_tail: Sequence[str],
    report_html: str | None = None,
) -> Outcome:
    """Map one worker run to its outcome."""
    report = (result or {}).get("report")
    common: dict[str, Any] = {
        "validation": (result or {}).get("validation"),
        "report": report,
        "report_html": report_html,
        "warnings": list((result or {}).get("warnings") or []),
    }
    if returncode == EXIT_OK and result is not None and result.get("ok"):
        return Outcome(
            status="succeeded",
            message="export validated and published at " + str(result.get("output")),
            output=result.get("output"),
            **common,
        )
    if returncode < 0:
        reason = describe_exit(returncode)
        return Outcome(
            status="failed",
            message=reason,
            error_code="worker_killed",
            error_message=reason + _tail(stderr_tail),
            **common,
        )
    if returncode == EXIT_VALIDATION_FAILED and result is not None:
        failed = result.get("failed_output") or result.get("temp_output")
        summary = result.get("validation") or {}
        message = (
            f"the export failed validation ({summary.get('errors', '?')} error finding(s)); "
            f"report attached" + (f", export kept at {failed}" if failed else "")
        )
        return Outcome(
            status="failed",
            message=message,
            error_code="validation_failed",
            error_message=message,
            failed_output=failed,
            **common,
        )
    if error is not None:
        code = str(error.get("code") or EXIT_MEANINGS.get(returncode, ("worker_error", ""))[0])
        message = str(error.get("message") or describe_exit(returncode))
        return Outcome(status="failed", message=message, error_code=code, error_message=message, **common)
    if returncode == EXIT_OK:
        message = "worker exited without reporting a validated export" + _tail(stderr_tail)
        return Outcome(
            status="failed", message=message, error_code="worker_error", error_message=message, **common
        )
    code, meaning = EXIT_MEANINGS.get(returncode, ("worker_crashed", "the worker failed"))
    message = f"{meaning}: {describe_exit(returncode)}{_tail(stderr_tail)}"
    return Outcome(status="failed", message=message, error_code=code, error_message=message, **common)
