"""Liveness (`/healthz`) and readiness (`/readyz`: the store takes a write, the dispatcher runs)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import ExecutorDep, StoreDep

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
    body = {
        "status": "ready" if all(checks.values()) else "not ready",
        "checks": checks,
        "slots": {"total": usage.total, "in_use": usage.in_use, "concurrency": usage.concurrency},
    }
    return JSONResponse(body, status_code=200 if all(checks.values()) else 503)
