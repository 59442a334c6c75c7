"""`/`: a minimal HTML page listing recent jobs (every value escaped) with links to their reports."""

from __future__ import annotations

import html
import time

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.api.deps import StoreDep
from service.store import JobRecord

router = APIRouter(tags=["ui"])

PAGE_SIZE = 100
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}"
    "td,th{padding:.3rem .8rem;border-bottom:1px solid #ddd;text-align:left}"
    ".succeeded{color:#176f2c}.failed{color:#b00020}.cancelled{color:#777}"
)


def _row(job: JobRecord) -> str:
    e = html.escape
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
    progress = f"{e(job.progress_stage)} {job.progress_fraction or 0:.0%}" if job.progress_stage else ""
    report = f'<a href="/v1/jobs/{e(job.id)}/report">report</a>' if job.report is not None else ""
    error = e(job.error_message or "")
    return (
        f'<tr><td><a href="/v1/jobs/{e(job.id)}">{e(job.id)}</a></td><td>{e(created)}</td>'
        f'<td class="{e(job.status)}">{e(job.status)}</td><td>{e(str(job.request.get("source", "")))}</td>'
        f"<td>{e(str(job.request.get('recipe', '')))}</td><td>{progress}</td><td>{report}</td>"
        f"<td>{error}</td></tr>"
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(store: StoreDep) -> HTMLResponse:
    """The job list."""
    jobs, has_more = store.list_jobs(limit=PAGE_SIZE)
    rows = "".join(_row(job) for job in jobs) or '<tr><td colspan="8">no jobs yet</td></tr>'
    more = f"<p>showing the newest {PAGE_SIZE}; use GET /v1/jobs to page.</p>" if has_more else ""
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'><title>quantgate jobs</title>"
        f"<style>{STYLE}</style>"
        f"</head><body><h1>quantgate jobs</h1><p><a href='/docs'>API docs</a></p><table><tr><th>id</th>"
        f"<th>created</th><th>status</th><th>source</th><th>recipe</th><th>progress</th><th>report</th>"
        f"<th>error</th></tr>{rows}</table>{more}</body></html>"
    )
