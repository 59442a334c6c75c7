"""The HTTP API against a real server that accepts jobs but runs none (`--max-concurrency 0`):
auth, path confinement, malformed bodies, size limits, idempotency, paging, cancel of queued jobs,
the validation endpoint, the HTML index, health, metrics and OpenAPI."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from svc_helpers import API_TOKEN, FAKE_HF_TOKEN, FAST_CALIBRATION, ServerHandle


@dataclass
class Env:
    server: ServerHandle
    client: httpx.Client
    root: Path  # an allowed root holding models/gemma4
    outside: Path  # a directory outside every root


@pytest.fixture(scope="module")
def env(module_launcher, tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Env:
    base = tmp_path_factory.mktemp("api")
    root = Path(os.path.realpath(base / "root"))
    (root / "models").mkdir(parents=True)
    (root / "models" / "gemma4").symlink_to(model_root / "gemma4")  # a link to another allowed root
    outside = Path(os.path.realpath(base / "outside"))
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    server = module_launcher(
        base / "data", roots=[root, model_root], token=API_TOKEN, args=["--max-concurrency", "0"]
    )
    with server.client as client:
        yield Env(server=server, client=client, root=root, outside=outside)


def job_body(env: Env, **changes: object) -> dict:
    return {
        "source": str(env.root / "models" / "gemma4"),
        "recipe": "nvfp4",
        "calibration": FAST_CALIBRATION,
        **changes,
    }


def test_health_is_open_everything_else_needs_the_token(env: Env) -> None:
    bare = httpx.Client(base_url=env.server.base_url)
    assert bare.get("/healthz").json() == {"status": "ok"}
    assert bare.get("/readyz").status_code == 200
    for method, path in [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/metrics"),
        ("GET", "/"),
        ("POST", "/v1/validations"),
        ("GET", "/v1/jobs/qjob_x/events"),
    ]:
        response = bare.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = bare.get("/v1/jobs", headers={"Authorization": "Bearer " + "x" * len(API_TOKEN)})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "missing or invalid bearer token"
    assert bare.get("/v1/jobs", headers={"Authorization": API_TOKEN}).status_code == 401  # no scheme
    assert env.client.get("/v1/jobs").status_code == 200


@pytest.mark.parametrize("field", ["source", "output", "calibration.data"])
@pytest.mark.parametrize(
    "path",
    [
        "{root}/../outside",
        "{root}/models/../../outside/x",
        "{root}/escape",
        "{root}/escape/sub",
        "{outside}",
        "/etc",
        "../../etc",
    ],
)
def test_paths_outside_the_roots_are_forbidden(env: Env, field: str, path: str) -> None:
    value = path.format(root=env.root, outside=env.outside)
    body = job_body(env)
    if field == "calibration.data":
        body["calibration"] = {**FAST_CALIBRATION, "data": value}
    else:
        body[field] = value
    response = env.client.post("/v1/jobs", json=body)
    assert response.status_code == 403, response.text
    assert "outside the allowed roots" in response.json()["detail"]


@pytest.mark.parametrize("path", ["{root}/../outside", "{root}/escape", "/etc"])
def test_validation_paths_outside_the_roots_are_forbidden(env: Env, path: str) -> None:
    response = env.client.post("/v1/validations", json={"path": path.format(root=env.root)})
    assert response.status_code == 403 and "outside the allowed roots" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"recipe": "nvfp4"}, "source: Field required"),
        ({"source": "/x", "recipe": "nvfp5"}, "unknown recipe 'nvfp5'; choose one of: nvfp4"),
        (
            {"source": "/x", "recipe": "nvfp4", "calibration": {"samples": 0}},
            "calibration.samples: Input should be greater than or equal to 1",
        ),
        ({"source": "/x", "recipe": "nvfp4", "dialect": "gguf"}, "dialect: Input should be 'modelopt'"),
        ({"source": "/x", "recipe": "nvfp4", "exclude": "lm_head"}, "exclude: Input should be a valid list"),
        ({"source": "", "recipe": "nvfp4"}, "source: String should have at least 1 character"),
    ],
)
def test_malformed_job_bodies_are_422_with_a_message(env: Env, body: dict, expected: str) -> None:
    response = env.client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert expected in response.json()["message"]


def test_unknown_fields_and_bad_json_are_422_and_inputs_are_not_echoed(env: Env) -> None:
    response = env.client.post("/v1/jobs", json={**job_body(env), "hf_token": FAKE_HF_TOKEN})
    assert (
        response.status_code == 422
        and "hf_token: Extra inputs are not permitted" in response.json()["message"]
    )
    assert FAKE_HF_TOKEN not in response.text
    broken = env.client.post(
        "/v1/jobs", content=b'{"source": "/x", "recipe": ', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and "JSON decode error" in broken.json()["message"]
    both = env.client.post("/v1/validations", json={"path": "/x", "hub_repo": "org/name"})
    assert both.status_code == 422 and 'exactly one of "path"' in both.json()["message"]
    bad_repo = env.client.post("/v1/validations", json={"hub_repo": "org/../../etc"})
    assert bad_repo.status_code == 422 and "not a Hub repo id" in bad_repo.json()["message"]


def test_oversized_bodies_are_413(env: Env) -> None:
    huge = job_body(env, exclude=["x" * 500] * 2500)  # ~1.25 MB > the 1 MiB default limit
    response = env.client.post("/v1/jobs", json=huge)
    assert response.status_code == 413 and "larger than" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        yield b'{"source": "/x", "recipe": "nvfp4", "exclude": ["'
        for _ in range(300):
            yield b"y" * 4096
        yield b'"]}'

    streamed = env.client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_submit_get_list_and_cancel_a_queued_job(env: Env) -> None:
    response = env.client.post("/v1/jobs", json=job_body(env))
    assert response.status_code == 201, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["object"] == "quantization.job"
    assert job["source"] == str(Path(os.path.realpath(env.root / "models" / "gemma4")))  # resolved
    assert job["output_path"] is None and job["error"] is None and job["attempts"] == 0
    assert job["params"]["calibration"]["samples"] == FAST_CALIBRATION["samples"]
    assert env.client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    cancelled = env.client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert env.client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    events = env.client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["data"]["status"] for e in events["data"]] == ["queued", "cancelled"]
    assert env.client.get("/v1/jobs/qjob_missing").status_code == 404
    assert env.client.post("/v1/jobs/qjob_missing/cancel").status_code == 404
    report = env.client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 404 and "no report yet" in report.json()["detail"]


def test_outputs_must_be_free(env: Env) -> None:
    taken = env.root / "taken"
    taken.mkdir(exist_ok=True)
    (taken / "file").write_text("x")
    response = env.client.post("/v1/jobs", json=job_body(env, output=str(taken)))
    assert response.status_code == 409 and "already exists" in response.json()["detail"]
    first = env.client.post("/v1/jobs", json=job_body(env, output=str(env.root / "out-a")))
    assert first.status_code == 201
    second = env.client.post("/v1/jobs", json=job_body(env, output=str(env.root / "out-a")))
    assert second.status_code == 409 and "unfinished job" in second.json()["detail"]
    assert env.client.post("/v1/jobs", json=job_body(env, output=str(env.root))).status_code == 409


def test_paging_is_newest_first(env: Env) -> None:
    ids = [env.client.post("/v1/jobs", json=job_body(env)).json()["id"] for _ in range(5)]
    page = env.client.get("/v1/jobs", params={"limit": 3}).json()
    assert page["object"] == "list" and page["has_more"]
    assert [j["id"] for j in page["data"]] == ids[::-1][:3]
    assert page["first_id"] == ids[-1] and page["last_id"] == ids[-3]
    rest = env.client.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][3:5]
    assert env.client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    assert env.client.get("/v1/jobs", params={"limit": 101}).status_code == 422


def test_idempotency_key_replays_and_rejects_other_bodies(env: Env) -> None:
    headers = {"Idempotency-Key": "submit-42"}
    first = env.client.post(
        "/v1/jobs", json=job_body(env, output=str(env.root / "idem-out")), headers=headers
    )
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    replay = env.client.post(
        "/v1/jobs", json=job_body(env, output=str(env.root / "idem-out")), headers=headers
    )
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    other = env.client.post("/v1/jobs", json=job_body(env, recipe="fp8"), headers=headers)
    assert other.status_code == 422 and "different request body" in other.json()["detail"]


def test_concurrent_duplicates_create_one_job(env: Env) -> None:
    headers = {"Idempotency-Key": "burst-1", "Authorization": f"Bearer {API_TOKEN}"}

    def post(_: int) -> str:
        with httpx.Client(base_url=env.server.base_url, headers=headers, timeout=30) as client:
            response = client.post("/v1/jobs", json=job_body(env))
            assert response.status_code == 201
            return response.json()["id"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(post, range(32)))
    assert len(ids) == 1


def test_validation_endpoint_reports_and_stores(env: Env) -> None:
    response = env.client.post("/v1/validations", json={"path": str(env.root / "models" / "gemma4")})
    assert response.status_code == 201, response.text
    validation = response.json()
    assert validation["object"] == "validation" and validation["ok"] is True
    assert set(validation["verdicts"]) == {"vllm", "sglang"}
    assert validation["report"]["quantized"] is False
    stored = env.client.get(f"/v1/validations/{validation['id']}")
    assert stored.json() == validation
    page = env.client.get(f"/v1/validations/{validation['id']}", headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html") and "<html" in page.text.lower()
    assert env.client.get("/v1/validations/qval_missing").status_code == 404
    missing = env.client.post("/v1/validations", json={"path": str(env.root / "nothing-here")})
    assert missing.status_code == 422 and "cannot validate" in missing.json()["detail"]
    hub = env.client.post("/v1/validations", json={"hub_repo": "org/private-model"})  # offline: unreadable
    assert hub.status_code == 422 and FAKE_HF_TOKEN not in hub.text


def test_validation_endpoint_engine_releases_and_shape(env: Env) -> None:
    path = str(env.root / "models" / "gemma4")
    response = env.client.post("/v1/validations", json={
        "path": path, "engine_versions": {"vllm": "0.10.2"}, "tensor_parallel_size": 8, "expert_parallel": True})
    assert response.status_code == 201, response.text
    report = response.json()["report"]
    assert report["engine_versions"]["vllm"] == "0.10.2" and report["verdicts"]["vllm"]["engine_version"] == "0.10.2"
    assert report["deployment"] == {"tensor_parallel_size": 8, "expert_parallel": True}
    assert response.json()["ok"] is False and any(f["code"] == "QG711" for f in report["findings"])  # 4 heads / 8
    for bad in ({"engine_versions": {"trt": "1.0"}}, {"engine_versions": {"vllm": "newest"}},
                {"tensor_parallel_size": 0}, {"expert_parallel": "maybe"}):
        assert env.client.post("/v1/validations", json={"path": path, **bad}).status_code == 422, bad


def test_index_page_escapes_everything(env: Env) -> None:
    hostile = env.root / "<script>alert(1)</script>"
    if not hostile.exists():  # a real checkpoint: unreadable sources are refused at submit time
        shutil.copytree(env.root / "models" / "gemma4", hostile)
    response = env.client.post("/v1/jobs", json=job_body(env, source=str(hostile)))
    assert response.status_code == 201
    page = env.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text
    assert f'href="/v1/jobs/{response.json()["id"]}"' in page.text


def test_readyz_metrics_and_openapi(env: Env) -> None:
    validated = env.client.post("/v1/validations", json={"path": str(env.root / "models" / "gemma4")})
    assert validated.status_code == 201
    ready = env.client.get("/readyz").json()
    assert ready["checks"] == {"store_writable": True, "executor_alive": True}
    assert ready["slots"]["concurrency"] == 0  # accept-only server
    metrics = env.client.get("/metrics").text
    queued = sum(
        1 for j in env.client.get("/v1/jobs", params={"limit": 100}).json()["data"] if j["status"] == "queued"
    )
    assert f"quantgate_queue_depth {float(queued)}" in metrics
    assert 'quantgate_jobs{status="cancelled"}' in metrics and "quantgate_gpu_slots_in_use 0.0" in metrics
    assert 'quantgate_validation_verdicts_total{engine="vllm",verdict="loads"}' in metrics
    schema = httpx.get(env.server.base_url + "/openapi.json").json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/report",
        "/v1/validations",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(schema["paths"])
    assert httpx.get(env.server.base_url + "/docs").status_code == 200


def test_in_process_app_dependencies_can_be_overridden(tmp_path: Path) -> None:
    """create_app(settings) runs in-process too; routes take settings/store/executor as dependencies."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from quantgate.service.api.deps import get_settings
    from quantgate.service.app import create_app
    from quantgate.service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", max_concurrency=0)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/v1/jobs").json()["data"] == []
        no_type = client.post("/v1/jobs", content=b'{"source": "/x"}')
        assert no_type.status_code == 422 and "Content-Type: application/json" in no_type.json()["message"]
        app.dependency_overrides[get_settings] = lambda: settings.model_copy(
            update={"api_tokens": [SecretStr(API_TOKEN)]}
        )
        assert client.get("/v1/jobs").status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 200
        app.dependency_overrides.clear()
        assert client.get("/v1/jobs").status_code == 200
