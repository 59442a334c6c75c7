"""`/v1/jobs`: submit, list, get, cancel, events (JSON or SSE) and the validation report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from quantgate.service.api.content import best_match, job_event_stream
from quantgate.service.api.deps import ExecutorDep, JobDep, SettingsDep, StoreDep
from quantgate.service.ids import is_id, new_id
from quantgate.service.schemas import EventList, EventPublic, JobCreate, JobList, JobPublic
from quantgate.service.security import classify_source, resolve_under_roots
from quantgate.service.settings import Settings
from quantgate.service.store import IdempotencyConflict, OutputTaken

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_ID_PREFIX = "qjob"
MAX_IDEMPOTENCY_KEY = 255
SSE = "text/event-stream"


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _resolved_request(body: JobCreate, settings: Settings) -> dict[str, Any]:
    """The body with local paths resolved and confined to the allowed roots (PathNotAllowed -> 403)."""
    request = body.model_dump(mode="json")
    if classify_source(body.source) == "local":
        request["source"] = str(resolve_under_roots(body.source, settings.roots))
    data = body.calibration.data
    if data != "random" and classify_source(data) == "local":
        request["calibration"]["data"] = str(resolve_under_roots(data, settings.roots))
    return request


def _check_source(source: str) -> None:
    """What the worker would refuse at once (missing, unreadable config or headers, unsupported layout)
    answers 422 now with the worker's own message; the worker checks again (the files may change)."""
    from quantgate.exporter.source_checks import check_local_source  # torch-free: the validator's header pass
    from quantgate.exporter.quantized_source import AlreadyQuantizedError
    from quantgate.validators.errors import CheckpointReadError, UnsupportedArchitectureError

    try:
        check_local_source(source)
    except (CheckpointReadError, UnsupportedArchitectureError, AlreadyQuantizedError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _output_path(body: JobCreate, job_id: str, settings: Settings) -> Path:
    """Where the export goes: the requested directory (confined, unused) or <data-dir>/outputs/<id>."""
    if body.output is None:
        return settings.outputs_dir / job_id
    output = resolve_under_roots(body.output, settings.roots)
    if output in settings.roots:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"output {body.output!r} is an allowed root itself; name a directory inside it",
        )
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"output {str(output)!r} already exists and is not empty"
        )
    return output


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={
        403: {"description": "a path outside the allowed roots"},
        409: {"description": "the output path is taken"},
        422: {"description": "invalid body, a local source that cannot be read as a checkpoint, or an "
              "Idempotency-Key reused with another body"},
    },
)
def create_job(
    body: JobCreate,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    executor: ExecutorDep,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)] = None,
) -> JobPublic:
    """Submit a quantize job. A replayed Idempotency-Key returns the job it created."""
    request_hash = _request_hash(body)
    try:
        existing = store.idempotent_job(idempotency_key, request_hash) if idempotency_key else None
        if existing is not None:  # a replay skips the path checks: the first request passed them
            response.headers["Idempotent-Replayed"] = "true"
            response.headers["Location"] = f"/v1/jobs/{existing.id}"
            return JobPublic.from_record(existing)
        job_id = new_id(JOB_ID_PREFIX)
        request = _resolved_request(body, settings)
        if classify_source(body.source) == "local":
            _check_source(request["source"])
        output = _output_path(body, job_id, settings)
        job, replayed = store.create_job(
            job_id=job_id,
            request=request,
            output_path=str(output),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
    except OutputTaken:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"output {body.output!r} is already the output of an unfinished job"
        ) from None
    except IdempotencyConflict:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "this Idempotency-Key was already used with a different request body",
        ) from None
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        executor.submit(job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_record(job)


@router.get("", response_model=JobList)
def list_jobs(
    store: StoreDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """List jobs, newest first; pass the last id as `after` for the next page."""
    if after is not None and not is_id(after, JOB_ID_PREFIX):
        raise RequestValidationError([{
            "loc": ("query", "after"), "type": "value_error",
            "msg": f"not a job id ({JOB_ID_PREFIX}_ and 26 characters); pass last_id of the previous page"}])
    jobs, has_more = store.list_jobs(after=after, limit=limit)
    data = [JobPublic.from_record(job) for job in jobs]
    return JobList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job: JobDep) -> JobPublic:
    """Get one job."""
    return JobPublic.from_record(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job: JobDep, store: StoreDep, executor: ExecutorDep) -> JobPublic:
    """Cancel a job (idempotent): queued -> cancelled, running -> cancelling -> cancelled."""
    updated, stop_worker = store.request_cancel(job.id)
    if stop_worker:
        executor.cancel(job.id)
    return JobPublic.from_record(updated)


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={200: {"content": {SSE: {}}, "description": "JSON page, or an SSE stream when asked"}},
)
def list_events(
    request: Request,
    job: JobDep,
    store: StoreDep,
    after: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """Events oldest first after `after`; `Accept: text/event-stream` streams them until the job ends."""
    if best_match(request, ("application/json", SSE)) == SSE:
        cursor = after if after is not None else int(last_event_id) if (last_event_id or "").isdigit() else 0
        return StreamingResponse(
            job_event_stream(request, store, job.id, cursor),
            media_type=SSE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events, has_more = store.list_events(job.id, after=after, limit=limit)
    return EventList(data=[EventPublic.from_record(event) for event in events], has_more=has_more)


@router.get(
    "/{job_id}/report", responses={200: {"content": {"text/html": {}}}, 404: {"description": "no report yet"}}
)
def get_report(request: Request, job: JobDep) -> Response:
    """The validator's report of the job's export: JSON, or the HTML page when the client prefers HTML."""
    if job.report is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"job {job.id} has no report yet (status {job.status}); reports exist once the "
            "export has been validated",
        )
    if best_match(request, ("application/json", "text/html")) == "text/html" and job.report_html:
        return HTMLResponse(job.report_html)
    return JSONResponse(job.report)
