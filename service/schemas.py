"""Request and response models of the HTTP API (one family per resource)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from quantgate.exporter.recipes import WRITABLE_DIALECTS, default_dialects_text  # torch-free: recipe and dialect names
from quantgate.service.security import HUB_REPO_ID
from quantgate.service.store import EventRecord, JobRecord, ValidationRecord

__all__ = [
    "CalibrationOptions",
    "EventList",
    "EventPublic",
    "JobCreate",
    "JobError",
    "JobList",
    "JobProgress",
    "JobPublic",
    "PushOptions",
    "ValidationCreate",
    "ValidationPublic",
]

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
MAX_PATH_CHARS = 4096
#: Job-body fields of recipe "auto", echoed in a job's params.
AUTO_PARAMS: tuple[str, ...] = ("bits", "candidates", "method", "score_samples")
MAX_GPUS_PER_JOB = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def no_nul(value: str | None) -> str | None:
    """A NUL byte cannot be in a file name (the OS refuses it: `embedded null byte`): 422, not 500."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain a NUL byte (\\u0000)")
    return value


class _FromRecord(BaseModel):
    """A public view that is a store record's fields under the same names."""

    @classmethod
    def from_record(cls, record: EventRecord | ValidationRecord) -> Self:
        return cls.model_validate(record, from_attributes=True)


# Calibration options of a job (only used by recipes that need activation scales).
class CalibrationOptions(_Strict):
    data: str = Field(
        "random",
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description='"random", a local text/JSONL file under the allowed roots, or a dataset id',
    )
    samples: int = Field(512, ge=1, le=1_000_000)
    seq_len: int = Field(512, ge=1, le=131_072)
    batch_size: int = Field(8, ge=1, le=4096)
    all_experts: bool = Field(True, description="route calibration tokens through every expert")

    _data_has_no_nul = field_validator("data")(no_nul)


# Where a job pushes its validated export (exporter.publish); the server's HF_TOKEN must allow writing.
class PushOptions(_Strict):
    repo_id: str = Field(min_length=3, max_length=192, description="Hub repo to push to (org/name), created if missing")
    private: bool = Field(False, description="create the repo private (ignored when it exists)")
    revision: str | None = Field(None, min_length=1, max_length=256,
                                 description="branch to commit to, created from main when missing (default main)")

    @field_validator("repo_id")
    @classmethod
    def _hub_id(cls, value: str) -> str:
        from quantgate.exporter.publish import check_repo_id  # torch-free
        from quantgate.validators.errors import UsageError

        try:
            return check_repo_id(value)
        except UsageError as exc:
            raise ValueError(str(exc)) from None


# Body of POST /v1/jobs.
class JobCreate(_Strict):
    source: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="a local directory under the allowed roots, or a Hub repo id (org/name)",
    )
    revision: str | None = Field(None, max_length=256, description="Hub branch, tag or commit")
    recipe: str = Field(min_length=1, max_length=64, description="nvfp4, nvfp4_mlp_only, fp8, ..., auto")
    dialect: Literal[WRITABLE_DIALECTS] | None = Field(  # type: ignore[valid-type]
        None, description=f"output format; default: the recipe's own ({default_dialects_text()})")
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    exclude: list[str] = Field(
        default_factory=list, max_length=1024, description="extra module name patterns to leave unquantized"
    )
    output: str | None = Field(
        None,
        max_length=MAX_PATH_CHARS,
        description="output directory under the allowed roots; default <data-dir>/outputs/<job id>",
    )
    push_to_hub: PushOptions | None = Field(
        None, description="after the export validates, push it with a generated model card; a failed "
        "validation is never pushed")
    gpus: int = Field(
        1,
        ge=0,
        le=MAX_GPUS_PER_JOB,
        description="GPUs the job needs, all on one node (Ray executor); 0 runs it on CPU only. The "
        "local executor runs every job on one slot",
    )

    # recipe "auto" only (exporter.auto.options): per-layer NVFP4 / FP8 / BF16 under a bit budget
    bits: float | None = Field(
        None, description='recipe "auto": effective bits per weight to fit (NVFP4 4.5, FP8 8, BF16 16)'
    )
    candidates: list[str] | None = Field(
        None, min_length=1, max_length=8, description='recipe "auto": formats to choose from (default nvfp4, fp8)'
    )
    method: Literal["gradient", "kl_div"] | None = Field(None, description='recipe "auto": sensitivity score')
    score_samples: int | None = Field(None, ge=1, le=1_000_000, description='recipe "auto": sequences scored')

    _paths_have_no_nul = field_validator("source", "output", "revision")(no_nul)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str) -> str:
        from quantgate.exporter.recipes import recipe_names  # torch-free table shared with the exporter

        if value not in recipe_names():
            raise ValueError(f"unknown recipe {value!r}; choose one of: {', '.join(recipe_names())}")
        return value

    @model_validator(mode="after")
    def _auto_options(self) -> JobCreate:
        from quantgate.exporter.auto.options import check_job_options
        from quantgate.validators.errors import UsageError

        try:
            check_job_options(self.recipe, bits=self.bits, candidates=self.candidates, method=self.method,
                              score_samples=self.score_samples)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _recipe_dialect(self) -> JobCreate:
        """Resolve the default dialect and refuse a recipe the dialect cannot spell (w4a16 as modelopt)."""
        from quantgate.exporter.auto.options import AUTO_DIALECT, AUTO_RECIPE
        from quantgate.exporter.recipes import API_DIALECT, check_dialect, resolve_dialect
        from quantgate.validators.errors import UsageError

        if self.recipe == AUTO_RECIPE:
            if self.dialect not in (None, AUTO_DIALECT):
                raise ValueError(f"recipe {AUTO_RECIPE} writes ModelOpt MIXED_PRECISION only; use dialect {AUTO_DIALECT}")
        self.dialect = resolve_dialect(self.recipe, self.dialect)
        if self.recipe == AUTO_RECIPE:
            return self
        try:
            check_dialect(self.recipe, self.dialect, API_DIALECT)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("exclude")
    @classmethod
    def _reasonable_patterns(cls, value: list[str]) -> list[str]:
        if any(not pattern or len(pattern) > 512 for pattern in value):
            raise ValueError("exclude patterns must be 1 to 512 characters")
        return value


# Where a running job is.
class JobProgress(BaseModel):
    stage: str | None
    fraction: float | None


# Why a job failed.
class JobError(BaseModel):
    code: str = Field(description=(
        "Stable reason code. From the worker: bad_input (source, recipe or options rejected), no_space "
        "(the output root has no room for the planned shards), out_of_memory, quantgate_error, "
        "internal_error, push_rejected, push_failed, validation_failed; from the executor: worker_killed, "
        "worker_crashed, worker_error, worker_lost, launch_failed, unschedulable, interrupted."))
    message: str = Field(description="What went wrong and what to do next.")


# A job as the API returns it.
class JobPublic(BaseModel):
    id: str
    object: Literal["quantization.job"] = "quantization.job"
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    source: str
    revision: str | None
    recipe: str
    dialect: str
    params: dict[str, Any] = Field(description="calibration options and extra excludes")
    progress: JobProgress | None
    output_path: str | None = Field(description="the validated export (set once succeeded)")
    failed_output_path: str | None = Field(
        description="an export that failed validation, kept for inspection"
    )
    validation: dict[str, Any] | None = Field(description="ok, per-engine verdicts, finding counts")
    error: JobError | None
    attempts: int
    gpus: int = Field(description="GPUs the job asked for (0 = CPU only)")
    queue_reason: str | None = Field(
        None, description="why a queued job is not running yet (e.g. not enough free GPUs)"
    )
    report_url: str | None
    publish: dict[str, Any] | None = Field(
        None, description="where the validated export was pushed: repo_id, revision, commit, commit_url, repo_url")

    @classmethod
    def from_record(cls, job: JobRecord) -> JobPublic:
        request = job.request
        has_report = job.report is not None
        return cls(
            id=job.id,
            status=job.status,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            source=request["source"],
            revision=request.get("revision"),
            recipe=request["recipe"],
            dialect=request.get("dialect", "modelopt"),
            params={"calibration": request.get("calibration", {}), "exclude": request.get("exclude", []),
                    **{k: request[k] for k in (*AUTO_PARAMS, "push_to_hub") if request.get(k) is not None}},
            progress=JobProgress(stage=job.progress_stage, fraction=job.progress_fraction)
            if job.progress_stage
            else None,
            output_path=job.output_path if job.status == "succeeded" else None,
            failed_output_path=job.failed_output_path,
            validation=job.validation,
            error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
            attempts=job.attempts,
            gpus=int(request.get("gpus", 1)),
            queue_reason=job.queue_reason if job.status == "queued" else None,
            report_url=f"/v1/jobs/{job.id}/report" if has_report else None,
            publish=(job.report or {}).get("publish") if has_report else None,
        )


# GET /v1/jobs: a cursor page, newest first.
class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


# One job event (status change, progress, worker log line).
class EventPublic(_FromRecord):
    id: int
    object: Literal["quantization.job.event"] = "quantization.job.event"
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict[str, Any]


# GET /v1/jobs/{id}/events: oldest first after the cursor.
class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool


# Body of POST /v1/validations: a local checkpoint or a Hub repo.
class ValidationCreate(_Strict):
    path: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS)
    hub_repo: str | None = Field(None, min_length=3, max_length=256, description="org/name")
    revision: str | None = Field(None, max_length=256)
    strict: bool = Field(
        False, description="ok only without warnings and with a verdict for every engine (no `unknown`)"
    )
    engine_versions: dict[Literal["vllm", "sglang"], str] | None = Field(
        None, description='engine releases to predict, e.g. {"vllm": "0.10.2"}; default: the newest modelled')
    tensor_parallel_size: int | None = Field(None, ge=1, le=4096, description="check at this tensor-parallel size")
    expert_parallel: bool = Field(False, description="experts distributed over the ranks (EP size = TP size)")

    _paths_have_no_nul = field_validator("path", "hub_repo", "revision")(no_nul)

    @field_validator("engine_versions")
    @classmethod
    def _releases(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        from quantgate.validators.engine_facts import parse_version
        from quantgate.validators.errors import UsageError

        for engine, version in (value or {}).items():
            try:
                parse_version(version)
            except UsageError as exc:
                raise ValueError(f"{engine}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one_target(self) -> ValidationCreate:
        if (self.path is None) == (self.hub_repo is None):
            raise ValueError('give exactly one of "path" (a local checkpoint) or "hub_repo" (org/name)')
        if self.hub_repo is not None and not HUB_REPO_ID.match(self.hub_repo):
            raise ValueError(f"hub_repo {self.hub_repo!r} is not a Hub repo id (org/name)")
        if self.revision is not None and self.hub_repo is None:
            raise ValueError('"revision" only applies to "hub_repo"')
        return self


# A stored validation and its report.
class ValidationPublic(_FromRecord):
    id: str
    object: Literal["validation"] = "validation"
    created_at: float
    target: str
    revision: str | None
    ok: bool
    verdicts: dict[str, Any]
    report: dict[str, Any]

    @computed_field(description="engines whose verdict is `unknown`: a format quantgate does not model")
    @property
    def unknown_engines(self) -> list[str]:
        return sorted(e for e, v in self.verdicts.items() if isinstance(v, dict) and v.get("status") == "unknown")
