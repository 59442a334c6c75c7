"""Liveness (`/healthz`) and readiness (`/readyz`: the store takes a write, the dispatcher runs and,
for a cluster executor, the cluster is reachable; its GPUs total and free are reported)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from quantgate.service.api.deps import ExecutorDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(store: StoreDep, executor: ExecutorDep) -> JSONResponse:
    """Ready to accept jobs: 200, else 503 with what is wrong."""
    checks = {"store_writable": store.check_writable(), "executor_alive": executor.alive()}
    usage = executor.slots()
    cluster = executor.cluster()
    if cluster is not None:
        checks["cluster_reachable"] = cluster.reachable
    body: dict[str, Any] = {
        "status": "ready" if all(checks.values()) else "not ready",
        "checks": checks,
        "slots": {"total": usage.total, "in_use": usage.in_use, "concurrency": usage.concurrency},
    }
    if cluster is not None:
        body["cluster"] = asdict(cluster)
    return JSONResponse(body, status_code=200 if all(checks.values()) else 503)
