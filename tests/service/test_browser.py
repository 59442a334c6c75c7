"""The operator page in a real headless browser (Debian's chromium driven by Playwright).

A real `quantgate serve` with API tokens and real workers on 127.0.0.1: the operator enters the
token, submits a job on the tiny Gemma4 MoE with a push to a local fake Hub, watches its progress
arrive over the SSE stream until done and pushed, opens the HTML report, cancels a second (slow)
job, validates the export from the validation form, and opens `/docs`. Every request the browser
makes to another host is refused and recorded, so the page and Swagger UI are proved to work
offline. Screenshots of the job page and the report are saved (QUANTGATE_SCREENSHOT_DIR, else a
temp dir) and their paths printed.

Skips with the reason when chromium or the playwright package is missing (see README: never
`playwright install`; the test uses the system's /usr/bin/chromium).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from svc_helpers import API_TOKEN, FAKE_HF_TOKEN, FAST_CALIBRATION, SLOW_CALIBRATION, wait_terminal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validators"))
from fake_hub_write import WritableFakeHubServer  # noqa: E402

CHROMIUM = os.environ.get("QUANTGATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_TIMEOUT_MS = 240_000

if not os.access(CHROMIUM, os.X_OK):
    CHROMIUM = shutil.which("chromium") or CHROMIUM
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; or set QUANTGATE_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(pip install playwright; the system chromium is used, no browser download)")


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("QUANTGATE_SCREENSHOT_DIR")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[tuple[object, list[str]]]:
    """A fresh chromium profile; requests to any host but 127.0.0.1 are aborted and recorded."""
    executable = CHROMIUM
    outside: list[str] = []

    def offline(route) -> None:
        host = urlsplit(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:", "about:")) or host == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        context.route("**/*", offline)
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(30_000)
        try:
            yield page, outside
        finally:
            context.close()


def _submit(page, source: Path, calibration: dict, push: str = "") -> str:
    page.fill("#source", str(source))
    page.fill("#push-repo", push)
    page.select_option("#recipe", "nvfp4")
    page.fill("#calib-samples", str(calibration["samples"]))
    page.fill("#calib-seq-len", str(calibration["seq_len"]))
    page.fill("#calib-batch-size", str(calibration["batch_size"]))
    page.click("#submit-button")
    page.wait_for_function("document.getElementById('submit-state').textContent.startsWith('submitted qjob')")
    return page.inner_text("#submit-state").split()[-1]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[object]:
    (tmp_path / "hub").mkdir()
    with WritableFakeHubServer(tmp_path / "hub", FAKE_HF_TOKEN) as server:
        yield server


def test_operator_page_end_to_end(start_server, model_root: Path, tmp_path: Path, browser_page, shots: Path,
                                  hub) -> None:
    page, outside = browser_page
    hub_env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home")}
    server = start_server(tmp_path / "data", roots=[model_root], token=API_TOKEN, env=hub_env)

    first = page.goto(server.base_url + "/")
    assert first is not None and first.status == 401, "no token yet: the page, empty, with 401"
    assert "needs an API token" in page.inner_text("#notice")
    page.fill("#token", API_TOKEN)
    page.click("#token-form button")
    page.wait_for_selector("#jobs-body td:has-text('no jobs yet')")

    # submit (with a push to the local Hub), then watch the job over the event stream until it is done
    job_id = _submit(page, model_root / "gemma4", FAST_CALIBRATION, push="team/gemma4-tiny-NVFP4")
    assert page.is_visible("#watch") and page.inner_text("#watch-id") == job_id
    page.evaluate("""() => { window.__stages = [];
        new MutationObserver(() => window.__stages.push(document.getElementById('watch-stage').textContent))
          .observe(document.getElementById('watch-stage'), {childList: true, characterData: true, subtree: true}); }""")
    page.wait_for_function("document.getElementById('watch-status').textContent === 'succeeded'",
                           timeout=JOB_TIMEOUT_MS)
    page.wait_for_function("document.getElementById('watch-stage').textContent === 'done'")
    stages_seen = page.evaluate("window.__stages")
    assert page.eval_on_selector("#watch-progress", "el => el.value") == 1
    assert any(s.startswith(("calibrate", "quantize", "write")) for s in stages_seen), stages_seen
    events = page.inner_text("#events")
    assert "[progress]" in events and "validating the export" in events and "pushed to team/gemma4-tiny-NVFP4" in events
    commit = hub.commit_ids("team/gemma4-tiny-NVFP4")[0]
    assert page.inner_text("#watch-publish") == f"Pushed to team/gemma4-tiny-NVFP4 @ {commit[:12]}"
    assert any(s.startswith("upload") for s in stages_seen), stages_seen
    page.wait_for_selector(f"#jobs-body tr[data-job='{job_id}'] .status.succeeded")
    job_shot = shots / "job-page.png"
    page.screenshot(path=str(job_shot), full_page=True)

    # its HTML report, fetched with the token and shown in the page
    page.click("#report-button")
    page.wait_for_selector("#report-frame:not([hidden])")
    report = page.frame_locator("#report-frame")
    assert "vllm" in report.locator("body").inner_text().lower()
    report_shot = shots / "job-report.png"
    page.locator("#report-frame").screenshot(path=str(report_shot))

    # a second, slow job: cancelled from the page
    slow_id = _submit(page, model_root / "gemma4", SLOW_CALIBRATION, push="team/never")
    page.wait_for_function("['running', 'queued'].includes(document.getElementById('watch-status').textContent)")
    page.wait_for_function("!document.getElementById('cancel-button').disabled")
    page.click("#cancel-button")
    page.wait_for_function("document.getElementById('watch-status').textContent === 'cancelled'",
                           timeout=JOB_TIMEOUT_MS)
    with server.client as client:
        assert wait_terminal(client, slow_id)["status"] == "cancelled"
        export = client.get(f"/v1/jobs/{job_id}").json()["output_path"]

    # the validation form, on the export the first job wrote
    page.fill("#validate-path", export)
    page.click("#validate-button")
    page.wait_for_selector("#validation-result:not([hidden])", timeout=120_000)
    verdicts = page.inner_text("#validation-verdicts")
    assert verdicts.startswith("ok") and "vllm: loads" in verdicts and "sglang: loads" in verdicts
    assert "NVFP4" in page.frame_locator("#validation-frame").locator("body").inner_text()

    # /docs from the package, offline
    page.goto(server.base_url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title:has-text('quantgate')")
    page.wait_for_selector(".opblock-summary-path:has-text('/v1/jobs')")
    docs_shot = shots / "docs.png"
    page.screenshot(path=str(docs_shot))

    assert not (hub.root / "team" / "never").exists(), "a cancelled job pushes nothing"
    assert outside == [], f"the browser tried to leave the machine: {outside}"
    print(f"\nscreenshots:\n  job page: {job_shot}\n  report:   {report_shot}\n  /docs:    {docs_shot}")
