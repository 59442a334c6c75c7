"""`quantgate serve`: run the HTTP service (job API, validation endpoint, metrics) with uvicorn.

Configuration comes from `QUANTGATE_*` environment variables, overridden by these flags. API tokens
are read from `QUANTGATE_API_TOKENS` only (command lines are visible to every local user).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the quantize/validate HTTP service",
        description="Run the HTTP service. Environment: QUANTGATE_DATA_DIR, QUANTGATE_HOST, QUANTGATE_PORT, "
        "QUANTGATE_ALLOWED_ROOTS, QUANTGATE_API_TOKENS, QUANTGATE_GPU_SLOTS, QUANTGATE_MAX_CONCURRENCY, "
        "QUANTGATE_RETENTION_DAYS, QUANTGATE_CANCEL_GRACE_SECONDS, QUANTGATE_MAX_ATTEMPTS, "
        "QUANTGATE_EXECUTOR, QUANTGATE_RAY_ADDRESS, QUANTGATE_RAY_CPUS_PER_JOB, "
        "QUANTGATE_UNSCHEDULABLE_TIMEOUT_SECONDS, HF_TOKEN. Exit status: 0 stopped by SIGTERM/SIGINT; "
        "2 bad configuration (e.g. a non-loopback --host without QUANTGATE_API_TOKENS, a data dir another "
        "server holds); 3 the server could not start listening (the port is in use or not allowed).",
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1; anything else requires API tokens)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--data-dir", dest="data_dir", help="store, job logs and default outputs")
    parser.add_argument(
        "--allowed-root",
        dest="allowed_roots",
        action="append",
        metavar="PATH",
        help="local paths must resolve under one of these (repeatable; the data dir always is)",
    )
    parser.add_argument(
        "--gpu-slots",
        dest="gpu_slots",
        metavar="IDS",
        help="comma-separated CUDA device ids, or 'cpu' (default: detected)",
    )
    parser.add_argument(
        "--max-concurrency",
        dest="max_concurrency",
        type=int,
        help="jobs running at once (default: one per slot; 0 accepts jobs but runs none)",
    )
    parser.add_argument(
        "--retention-days", dest="retention_days", type=float, metavar="DAYS",
        help="delete finished jobs, their events and validations after this many days (default 30)",
    )
    parser.add_argument(
        "--cancel-grace-seconds", dest="cancel_grace_seconds", type=float, metavar="S",
        help="a cancelled worker gets SIGTERM, then SIGKILL after this many seconds (default 10)",
    )
    parser.add_argument(
        "--max-attempts", dest="max_attempts", type=int, metavar="N",
        help="runs per job: a job interrupted by a server crash or a lost Ray worker is retried until "
        "it has used this many (default 2)",
    )
    parser.add_argument(
        "--log-level", dest="log_level", choices=("debug", "info", "warning", "error"),
        help="server log level on stderr (default info)",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="run jobs as worker processes on this host (default) or on a Ray cluster (pip install "
        "'quantgate[ray]'; see docs/RAY.md)",
    )
    parser.add_argument(
        "--ray-address",
        dest="ray_address",
        metavar="ADDR",
        help="Ray cluster to join (GCS host:port, ray://host:10001 or auto; default RAY_ADDRESS)",
    )
    parser.add_argument(
        "--ray-cpus-per-job", dest="ray_cpus_per_job", type=float, help="CPUs each job reserves (default 1)"
    )
    parser.add_argument(
        "--unschedulable-timeout-seconds",
        dest="unschedulable_timeout_seconds",
        type=float,
        help="fail a job no cluster node can fit after this long (default 600)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    names = (
        "host",
        "port",
        "data_dir",
        "allowed_roots",
        "gpu_slots",
        "max_concurrency",
        "retention_days",
        "cancel_grace_seconds",
        "max_attempts",
        "log_level",
        "executor",
        "ray_address",
        "ray_cpus_per_job",
        "unschedulable_timeout_seconds",
    )
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _stopped(signum: int, frame: object) -> None:
    logger.info("stopped by signal %d", signum)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from quantgate.service.app import DataDirLocked, create_app, open_service
    from quantgate.service.executors.base import ExecutorUnavailable
    from quantgate.service.settings import Settings

    try:
        settings = Settings(**_overrides(args))
    except ValidationError as exc:
        from quantgate.service.messages import error_message

        for error in exc.errors():
            sys.stderr.write(f"quantgate serve: {error_message(error)}\n")
        return 2
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.getLogger().setLevel(level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        service = open_service(settings)
    except (DataDirLocked, ExecutorUnavailable, OSError) as exc:
        sys.stderr.write(f"quantgate serve: {exc}\n")
        return 2
    app = create_app(settings, service=service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        log_config=None,
        access_log=True,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM that stopped it once its graceful shutdown is over; with this
    # handler in place (uvicorn restores it first) that ends the process with status 0.
    signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3
