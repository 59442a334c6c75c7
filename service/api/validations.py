"""`/v1/validations`: validate a local checkpoint or a Hub repo synchronously (header-only, fast)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse

from quantgate.service.api.content import best_match
from quantgate.service.api.deps import MetricsDep, SettingsDep, StoreDep
from quantgate.service.ids import new_id
from quantgate.service.schemas import ValidationCreate, ValidationPublic
from quantgate.service.security import resolve_under_roots
from quantgate.service.store import ValidationRecord

router = APIRouter(prefix="/v1/validations", tags=["validations"])

VALIDATION_ID_PREFIX = "qval"


def _run_validator(target: str, revision: str | None, token: str | None,
                   body: ValidationCreate | None = None) -> tuple[Any, str]:
    """(report, html) from the validator; unreadable targets become 422 with the validator's message.
    `body` carries the optional engine releases and serving shape."""
    from quantgate.validators.deployment import Deployment
    from quantgate.validators.errors import CheckpointReadError, UnsupportedArchitectureError, UsageError
    from quantgate.validators.render import render_html
    from quantgate.validators.report import validate

    try:
        deployment = None
        if body is not None and (body.tensor_parallel_size is not None or body.expert_parallel):
            deployment = Deployment(body.tensor_parallel_size, body.expert_parallel)
        report = validate(target, revision=revision, token=token,
                          engine_versions=body.engine_versions if body is not None else None, deployment=deployment)
    except (CheckpointReadError, UnsupportedArchitectureError, UsageError) as exc:
        reason = str(exc).removeprefix(f"{target}: ")  # the validator's messages start with the target
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"cannot validate {target}: {reason}"
        ) from None
    return report, render_html(report)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ValidationPublic,
    responses={
        403: {"description": "a path outside the allowed roots"},
        422: {"description": "invalid body, or the target cannot be read as a checkpoint"},
    },
)
def create_validation(
    body: ValidationCreate, response: Response, settings: SettingsDep, store: StoreDep, metrics: MetricsDep
) -> ValidationPublic:
    """Validate a checkpoint now and return the report with a verdict per engine (`loads`, `fails`,
    `loads_wrong`, or `unknown` for a format quantgate does not model; `strict` makes unknown not ok)."""
    if body.path is not None:
        target, revision, token = str(resolve_under_roots(body.path, settings.roots)), None, None
    else:
        assert body.hub_repo is not None
        target, revision = body.hub_repo, body.revision
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
    report, html = _run_validator(target, revision, token, body)
    # `unknown` (a format quantgate does not model) is never a pass under strict; plain `ok` means no error
    ok = report.strict_ok() if body.strict else report.ok
    record = store.create_validation(
        ValidationRecord(
            id=new_id(VALIDATION_ID_PREFIX),
            created_at=time.time(),
            target=target,
            revision=revision,
            ok=bool(ok),
            verdicts=dict(report.verdicts),
            report=report.to_dict(),
            report_html=html,
        )
    )
    metrics.validation_done(record.ok, record.verdicts)
    response.headers["Location"] = f"/v1/validations/{record.id}"
    return ValidationPublic.from_record(record)


@router.get(
    "/{validation_id}", response_model=ValidationPublic, responses={200: {"content": {"text/html": {}}}}
)
def get_validation(validation_id: str, request: Request, store: StoreDep) -> Any:
    """A stored validation: JSON, or the HTML report when the client prefers HTML."""
    record = store.get_validation(validation_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"validation {validation_id} not found")
    if best_match(request, ("application/json", "text/html")) == "text/html" and record.report_html:
        return HTMLResponse(record.report_html)
    return JSONResponse(ValidationPublic.from_record(record).model_dump(mode="json"))
