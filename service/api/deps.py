"""Route dependencies as `Annotated` types; tests replace them through `app.dependency_overrides`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from quantgate.service.executors.base import Executor
from quantgate.service.metrics import Metrics
from quantgate.service.security import token_matches
from quantgate.service.settings import Settings
from quantgate.service.store import JobRecord, Store

__all__ = [
    "ExecutorDep",
    "JobDep",
    "MetricsDep",
    "SettingsDep",
    "StoreDep",
    "get_executor",
    "get_job",
    "get_metrics",
    "get_settings",
    "get_store",
    "require_token",
]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.service.store


def get_executor(request: Request) -> Executor:
    return request.app.state.service.executor


def get_metrics(request: Request) -> Metrics:
    return request.app.state.service.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def require_token(request: Request, settings: SettingsDep) -> None:
    """Bearer token check, active whenever tokens are configured (constant-time comparison)."""
    if not settings.api_tokens:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    tokens = (token.get_secret_value() for token in settings.api_tokens)
    if scheme.lower() != "bearer" or not presented or not token_matches(presented.strip(), tokens):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_job(job_id: str, store: StoreDep) -> JobRecord:
    """The job named in the path, or 404."""
    job = store.get_job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


JobDep = Annotated[JobRecord, Depends(get_job)]
