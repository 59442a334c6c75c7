"""`create_app(settings)`: the FastAPI application, its routers, error mapping and lifespan.

`open_service(settings)` takes the data dir's lock (one server per data dir, so no job runs twice),
opens the store and builds the executor; the lifespan starts the executor (recovery, then
dispatching) and stops it on shutdown. The serve command opens the service before binding so
that start-up problems are reported as clear errors, not tracebacks.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO

from fastapi import Depends, FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from quantgate.service.api import docs, health, jobs, metrics, ui, validations
from quantgate.service.api.deps import require_token
from quantgate.service.executors.base import Executor
from quantgate.service.executors.local import LocalExecutor
from quantgate.service.messages import errors_message, public_error
from quantgate.service.metrics import Metrics
from quantgate.service.security import BodySizeLimit, PathNotAllowed
from quantgate.service.settings import Settings
from quantgate.service.store import Store

__all__ = ["DataDirLocked", "Service", "create_app", "executor_class", "open_service"]

logger = logging.getLogger(__name__)

LOCK_FILE = "server.lock"


class DataDirLocked(RuntimeError):
    """Another quantgate server already uses this data dir."""


@dataclass
class Service:
    """What one running server owns."""

    settings: Settings
    store: Store
    executor: Executor
    metrics: Metrics
    lock: IO[str] | None

    def close(self) -> None:
        self.store.close()
        if self.lock is not None:
            self.lock.close()  # releases the flock
            self.lock = None


def _lock_data_dir(settings: Settings) -> IO[str]:
    settings.data_path.mkdir(parents=True, exist_ok=True)
    handle = open(settings.data_path / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirLocked(
            f"another quantgate server is using {settings.data_path}; stop it or choose another --data-dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def executor_class(settings: Settings) -> Callable[..., Executor]:
    """The executor `settings.executor` names; ray is imported only when it is chosen."""
    if settings.executor == "ray":
        from quantgate.service.executors.ray import RayExecutor

        return RayExecutor
    return LocalExecutor


def open_service(settings: Settings, *, executor_factory: Callable[..., Executor] | None = None) -> Service:
    """Lock the data dir, open (and migrate) the store, build metrics and the executor."""
    lock = _lock_data_dir(settings)
    try:
        for directory in (settings.outputs_dir, settings.jobs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        store = Store(settings.db_path)
        holder: dict[str, Executor] = {}
        service_metrics = Metrics(
            store, lambda: holder["executor"].slots(), lambda: holder["executor"].cluster()
        )
        factory = executor_factory or executor_class(settings)
        executor = factory(settings, store, on_finished=service_metrics.job_finished)
        holder["executor"] = executor
    except BaseException:
        lock.close()
        raise
    return Service(settings=settings, store=store, executor=executor, metrics=service_metrics, lock=lock)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PathNotAllowed)
    async def _forbidden_path(request: Request, exc: PathNotAllowed) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{exc}; allowed roots are configured with --allowed-root"},
            status_code=status.HTTP_403_FORBIDDEN,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Inputs are not echoed back (a misplaced secret must not bounce into logs or clients).
        errors = [public_error(err) for err in exc.errors()]
        message = errors_message(exc.errors())
        about_body = any(err["loc"][:1] == ["body"] for err in errors)
        if about_body and request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            message += " (send the body as a JSON object with Content-Type: application/json)"
        return JSONResponse(
            {"detail": errors, "message": message}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
        )


def create_app(settings: Settings, *, service: Service | None = None) -> FastAPI:
    """The application; opens its own `Service` at start-up unless one is given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = service or open_service(settings)
        app.state.service = running
        running.executor.start()
        logger.info(
            "quantgate serving; data dir %s, allowed roots %s",
            settings.data_path,
            [str(root) for root in settings.roots],
        )
        try:
            yield
        finally:
            running.executor.stop()
            running.close()

    app = FastAPI(
        title="quantgate",
        version="0.1.0",
        summary="Quantize Hugging Face checkpoints and prove vLLM and SGLang will load them.",
        lifespan=lifespan,
        docs_url=None,  # service.api.docs serves /docs from the package (FastAPI's loads a CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    _install_error_handlers(app)
    authenticated = [Depends(require_token)]
    app.include_router(health.router)
    app.include_router(jobs.router, dependencies=authenticated)
    app.include_router(validations.router, dependencies=authenticated)
    app.include_router(metrics.router, dependencies=authenticated)
    app.include_router(ui.router)  # the page checks the token itself (401 + an empty page without it)
    app.include_router(docs.router)
    docs.mount_static(app)
    return app
