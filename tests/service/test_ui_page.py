"""The operator page and /docs over HTTP (in-process app, accept-only, no worker runs).

What the browser test cannot see cheaply: `/` without the token is a 401 page with no job data,
`/ui/jobs` needs the token, every value is escaped, and neither page nor /docs names another host.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import API_TOKEN

from quantgate.service.app import create_app
from quantgate.service.settings import Settings

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", max_concurrency=0, api_tokens=[API_TOKEN],
                        allowed_roots=[tmp_path])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _submit(client: TestClient, source: Path, tiny_model) -> str:
    """Queue a job on a real (tiny) checkpoint copied to `source`: the API checks sources at submit."""
    shutil.copytree(tiny_model("llama"), source)
    response = client.post("/v1/jobs", json={"source": str(source), "recipe": "fp8"}, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_page_without_token_is_401_and_holds_no_job(client: TestClient, tmp_path: Path, tiny_model) -> None:
    job_id = _submit(client, tmp_path / "secret-model-name", tiny_model)
    bare = client.get("/")
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert 'id="submit-form"' in bare.text and 'id="token"' in bare.text, "the page still renders"
    assert job_id not in bare.text and "secret-model-name" not in bare.text
    assert client.get("/ui/jobs").status_code == 401
    rows = client.get("/ui/jobs", headers=AUTH)
    assert rows.status_code == 200 and f'data-job="{job_id}"' in rows.text and "secret-model-name" in rows.text
    assert 'data-action="cancel"' in rows.text, "a queued job can be cancelled from its row"
    page = client.get("/", headers=AUTH)
    assert page.status_code == 200 and f'href="/v1/jobs/{job_id}"' in page.text
    assert "<option>nvfp4</option>" in page.text and "<option>auto</option>" in page.text


def test_row_text_is_escaped_and_never_fills_a_slot(client: TestClient, tmp_path: Path, tiny_model) -> None:
    _submit(client, tmp_path / "<img src=x onerror=alert(1)>{{rows}}{{auth}}", tiny_model)
    page = client.get("/", headers=AUTH).text
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;{{rows}}{{auth}}" in page


def test_page_and_docs_load_nothing_from_another_host(client: TestClient) -> None:
    page = client.get("/", headers=AUTH).text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text
    assert not EXTERNAL.search(page) and not EXTERNAL.search(docs.text), "no CDN"
    assert '"validatorUrl": null' in docs.text
    for asset in ("/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css",
                  "/static/ui/ui.js", "/static/ui/ui.css"):
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset
    assert client.get("/redoc").status_code == 404, "ReDoc would load from a CDN: turned off"
    assert "SwaggerUIBundle" in client.get("/static/swagger/swagger-ui-bundle.js").text
