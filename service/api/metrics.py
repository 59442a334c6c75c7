"""`/metrics` in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from quantgate.service.api.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(metrics: MetricsDep) -> Response:
    """Jobs by status, queue depth, slot usage, job durations, validation verdicts."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
