"""Service settings: `QUANTGATE_*` environment variables, overridden by `quantgate serve` flags.

Settings are built by the caller (the serve command, a test, the demo) and handed to
`create_app(settings)`; nothing here runs at import time. List settings take comma-separated
values in the environment (`QUANTGATE_ALLOWED_ROOTS=/models,/scratch`, `QUANTGATE_GPU_SLOTS=0,1`).
`HF_TOKEN` is read from the server's environment, kept as a secret and handed only to worker
processes through their environment.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "is_loopback"]

MIB = 1 << 20
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_list(value: object) -> object:
    """Comma-separated strings (env vars) become lists; lists pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything `quantgate serve` can be configured with."""

    model_config = SettingsConfigDict(env_prefix="QUANTGATE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        Path("quantgate-data"), description="SQLite store, job directories, default outputs"
    )
    host: str = Field("127.0.0.1", description="bind address; beyond loopback requires api_tokens")
    port: int = Field(8000, ge=0, le=65535)
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="local sources, outputs and validation paths must resolve under one of these "
        "(the data dir is always allowed)",
    )
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="bearer tokens; when set every /v1 route requires one"
    )
    gpu_slots: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="CUDA device ids, one slot each ('0,1'), or 'cpu'; default: CUDA_VISIBLE_DEVICES, "
        "then `nvidia-smi -L`, else one CPU slot",
    )
    max_concurrency: int | None = Field(
        None, ge=0, description="jobs running at once (default: one per slot; 0 = accept but never dispatch)"
    )
    retention_days: float = Field(
        30.0, gt=0, description="finished jobs, events and validations kept this long"
    )
    cancel_grace_seconds: float = Field(
        10.0, ge=0, description="SIGTERM -> SIGKILL delay for a cancelled worker"
    )
    max_attempts: int = Field(
        2,
        ge=1,
        description="runs per job; a job interrupted by a server crash is requeued "
        "until it has used this many",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="where jobs run: worker processes on this host, or tasks on a Ray cluster"
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster (GCS `host:port`, `ray://host:10001` or `auto`); default: RAY_ADDRESS, "
        "else a single-node Ray started in-process",
    )
    ray_cpus_per_job: float = Field(1.0, gt=0, description="CPUs each job reserves on its Ray node")
    unschedulable_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="a queued job asking for more GPUs than any cluster node has fails after this long",
    )
    max_body_bytes: int = Field(1 * MIB, ge=1024, description="larger request bodies get 413")
    worker_python: str = Field(sys.executable, description="interpreter that runs `-m quantgate.service.worker`")
    log_level: str = Field("info")
    hf_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("hf_token", "HF_TOKEN", "QUANTGATE_HF_TOKEN"), exclude=True
    )

    @field_validator("allowed_roots", "api_tokens", "gpu_slots", mode="before")
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("api_tokens")
    @classmethod
    def _no_blank_tokens(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(token.get_secret_value()) < 16 for token in value):
            raise ValueError(
                "api tokens must be at least 16 characters (use `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)"
            )
        return value

    @model_validator(mode="after")
    def _refuse_open_bind(self) -> Settings:
        if not is_loopback(self.host) and not self.api_tokens:
            raise ValueError(
                f"refusing to listen on {self.host!r} without API tokens: set QUANTGATE_API_TOKENS "
                "(comma-separated) or bind to 127.0.0.1"
            )
        return self

    @property
    def data_path(self) -> Path:
        """The data dir, absolute and with symlinks resolved."""
        return Path(os.path.realpath(self.data_dir))

    @property
    def roots(self) -> tuple[Path, ...]:
        """Allowed roots, resolved; the data dir is always one of them."""
        resolved = [Path(os.path.realpath(os.path.expanduser(root))) for root in self.allowed_roots]
        return tuple(dict.fromkeys([self.data_path, *resolved]))

    @property
    def db_path(self) -> Path:
        return self.data_path / "quantgate.sqlite3"

    @property
    def outputs_dir(self) -> Path:
        return self.data_path / "outputs"

    @property
    def jobs_dir(self) -> Path:
        return self.data_path / "jobs"
