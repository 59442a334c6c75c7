"""The operator page: `/` (submit, watch live, report, cancel, validate) and `/ui/jobs` (its rows).

Server-rendered HTML (every value escaped) plus `static/ui.js`, which calls the public `/v1` API
with the bearer token the operator typed (kept in sessionStorage) and follows a job through its
SSE event stream. Nothing is loaded from another host, so the page works offline.

`/` holds data (the newest jobs), so it needs the token like every `/v1` route; without one it
still answers with the page, but empty and with status 401, so a browser can show the token field
and the script loads the rows once the token is entered. `/ui/jobs` always requires the token.
"""

from __future__ import annotations

import html
import re
import time
from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse

from quantgate.service.api.deps import SettingsDep, StoreDep, require_token
from quantgate.service.store import JobRecord

__all__ = ["PAGE_SIZE", "router"]

router = APIRouter(tags=["ui"])

PAGE_SIZE = 100
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SLOT = re.compile(r"\{\{(\w+)\}\}")


@cache
def _template() -> str:
    return resources.files("quantgate.service").joinpath("static/ui.html").read_text(encoding="utf-8")


def _options(names: tuple[str, ...]) -> str:
    return "".join(f"<option>{html.escape(name)}</option>" for name in names)


def _recipe_options() -> str:
    from quantgate.exporter.recipes import recipe_names  # torch-free tables

    return _options(recipe_names())


def _dialect_options() -> str:
    from quantgate.exporter.recipes import WRITABLE_DIALECTS

    return _options(WRITABLE_DIALECTS)


def _row(job: JobRecord) -> str:
    e = html.escape
    job_id = e(job.id)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
    progress = ""
    if job.progress_stage and job.status not in TERMINAL:
        fraction = job.progress_fraction or 0
        progress = f'<progress max="1" value="{fraction:.3f}"></progress> {e(job.progress_stage)} {fraction:.0%}'
    report = (f'<a href="/v1/jobs/{job_id}/report" data-action="report">report</a>'
              if job.report is not None else "")
    cancel = '<button type="button" class="small" data-action="cancel">cancel</button>' \
        if job.status not in TERMINAL else ""
    return (
        f'<tr data-job="{job_id}"><td><a href="/v1/jobs/{job_id}" data-action="watch">{job_id}</a></td>'
        f"<td>{e(created)}</td>"
        f'<td><span class="status {e(job.status)}">{e(job.status)}</span></td>'
        f'<td class="source">{e(str(job.request.get("source", "")))}</td>'
        f"<td>{e(str(job.request.get('recipe', '')))}</td><td>{progress}</td><td>{report}</td>"
        f'<td>{cancel}</td><td class="error">{e(job.error_message or "")}</td></tr>'
    )


def _rows(store: StoreDep) -> tuple[str, bool]:
    jobs, has_more = store.list_jobs(limit=PAGE_SIZE)
    rows = "".join(_row(job) for job in jobs) or '<tr><td colspan="9" class="muted">no jobs yet</td></tr>'
    return rows, has_more


def _authorized(request: Request, settings: SettingsDep) -> bool:
    try:
        require_token(request, settings)
    except HTTPException:
        return False
    return True


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(request: Request, settings: SettingsDep, store: StoreDep) -> HTMLResponse:
    """The operator page, with the newest jobs when the request carries a valid token."""
    authorized = _authorized(request, settings)
    rows, has_more = _rows(store) if authorized else ("", False)
    more = f'<p class="muted">showing the newest {PAGE_SIZE}; use GET /v1/jobs to page.</p>' if has_more else ""
    values = {"rows": rows, "more": more, "recipe_options": _recipe_options(), "dialect_options": _dialect_options(),
              "auth": "required" if settings.api_tokens else "open",
              "token_hint": "required by this server" if settings.api_tokens else "not required here"}
    page = SLOT.sub(lambda match: values[match[1]], _template())  # one pass: job text is never re-scanned
    if authorized:
        return HTMLResponse(page)
    return HTMLResponse(page, status_code=401, headers={"WWW-Authenticate": "Bearer"})


@router.get("/ui/jobs", response_class=HTMLResponse, include_in_schema=False,
            dependencies=[Depends(require_token)])
def job_rows(store: StoreDep) -> HTMLResponse:
    """The job table's rows (what the page swaps in when it refreshes)."""
    rows, _ = _rows(store)
    return HTMLResponse(rows, headers={"Cache-Control": "no-store"})
