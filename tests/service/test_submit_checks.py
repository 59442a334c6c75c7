"""Bad input answered at the door by a real server (`--max-concurrency 0`: jobs are accepted, none run).

NUL bytes in path fields, sources that cannot be quantized (checked at submit time with the message
the worker gives, and still checked by the worker), query errors, malformed bodies, and messages
without pydantic's spelling ("Value error, ", CLI flags, a doubled path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from svc_helpers import API_TOKEN, FAST_CALIBRATION, ServerHandle

REPO = Path(__file__).resolve().parents[2]
NUL = "\x00"


@dataclass
class Env:
    server: ServerHandle
    client: httpx.Client
    root: Path  # an allowed root: models/gemma4 and the broken sources below


def _unreadable_sources(root: Path, model: Path) -> dict[str, tuple[Path, str]]:
    """name -> (source, a phrase of the reason): what the worker would refuse seconds later."""
    bad = root / "bad"
    (bad / "empty").mkdir(parents=True)
    truncated = bad / "truncated"
    truncated.mkdir()
    for item in model.iterdir():
        (truncated / item.name).write_bytes(item.read_bytes())
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    not_json = bad / "config-not-json"
    not_json.mkdir()
    for item in model.iterdir():
        (not_json / item.name).write_bytes(item.read_bytes())
    (not_json / "config.json").write_text("{not json")
    return {
        "missing": (bad / "no-such-model", "no such file or directory"),
        "empty": (bad / "empty", "no .safetensors files"),
        "truncated": (truncated, "truncated"),
        "config-not-json": (not_json, "config.json is not valid JSON"),
    }


@pytest.fixture(scope="module")
def env(module_launcher, tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Env:
    base = tmp_path_factory.mktemp("door")
    root = Path(os.path.realpath(base / "root"))
    root.mkdir()
    server = module_launcher(
        base / "data", roots=[root, model_root], token=API_TOKEN, args=["--max-concurrency", "0"]
    )
    with server.client as client:
        yield Env(server=server, client=client, root=root)


def job_body(model_root: Path, **changes: object) -> dict:
    return {"source": str(model_root / "gemma4"), "recipe": "nvfp4", "calibration": FAST_CALIBRATION, **changes}


@pytest.mark.parametrize("field", ["source", "output", "calibration.data", "validation.path"])
def test_a_nul_byte_in_a_path_is_422_not_500(env: Env, model_root: Path, field: str) -> None:
    value = f"{env.root}/a{NUL}b"
    if field == "validation.path":
        response = env.client.post("/v1/validations", json={"path": value})
    else:
        body = job_body(model_root)
        if field == "calibration.data":
            body["calibration"] = {**FAST_CALIBRATION, "data": value}
        else:
            body[field] = value
        response = env.client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert "must not contain a NUL byte" in response.json()["message"]
    assert "Traceback" not in env.server.log_text() and "embedded null byte" not in env.server.log_text()


def _worker_error(source: Path, tmp_path: Path) -> dict:
    """The error event of a real worker process (`python -m quantgate.service.worker SPEC`) given `source`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"job_id": "qjob_x", "source": str(source), "recipe": "nvfp4",
                                "output": str(tmp_path / "out"), "job_dir": str(tmp_path),
                                "calibration": FAST_CALIBRATION}))
    done = subprocess.run([sys.executable, "-m", "quantgate.service.worker", str(spec)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 2 and events[-1]["event"] == "error", done.stderr
    return events[-1]


def test_unreadable_sources_are_refused_at_submit_with_the_workers_message(
    env: Env, model_root: Path, tmp_path: Path
) -> None:
    before = env.client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    sources = _unreadable_sources(env.root, model_root / "gemma4")
    for name, (source, phrase) in sources.items():
        response = env.client.post("/v1/jobs", json=job_body(model_root, source=str(source)))
        assert response.status_code == 422, (name, response.text)
        detail = response.json()["detail"]
        assert phrase in detail and str(source) in detail, (name, detail)
        if name in ("missing", "truncated"):  # the worker keeps its check: the same words, later
            worker = _worker_error(source, tmp_path / name)
            assert worker["code"] == "bad_input" and worker["message"] == detail
    assert env.client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before  # nothing created
    assert env.client.post("/v1/jobs", json=job_body(model_root)).status_code == 201


def test_query_errors_have_no_body_hint_and_bad_cursors_are_422(env: Env, model_root: Path) -> None:
    negative = env.client.get("/v1/jobs", params={"limit": -1})
    assert negative.status_code == 422
    message = negative.json()["message"]
    assert message.startswith("query.limit: ") and "body" not in message and "JSON" not in message
    garbage = env.client.get("/v1/jobs", params={"after": "garbage"})
    assert garbage.status_code == 422 and garbage.json()["message"].startswith("query.after: not a job id")
    job = env.client.post("/v1/jobs", json=job_body(model_root)).json()
    page = env.client.get("/v1/jobs", params={"after": job["id"]})
    assert page.status_code == 200 and job["id"] not in [j["id"] for j in page.json()["data"]]


def test_a_malformed_body_says_where_and_why(env: Env) -> None:
    text = b'{"source": "/x", "recipe": }'
    response = env.client.post("/v1/jobs", content=text, headers={"content-type": "application/json"})
    assert response.status_code == 422
    message = response.json()["message"]
    position = text.index(b"}")
    assert message.startswith(f"body: not valid JSON at character {position} (Expecting value)"), message
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_messages_speak_the_apis_language(env: Env, model_root: Path) -> None:
    dialect = env.client.post("/v1/jobs", json=job_body(model_root, recipe="w4a16", dialect="modelopt"))
    assert dialect.status_code == 422
    message = dialect.json()["message"]
    assert '("dialect": "compressed-tensors")' in message and "--dialect" not in message
    nul = env.client.post("/v1/validations", json={"path": f"/a{NUL}"})
    unknown = env.client.post("/v1/jobs", json=job_body(model_root, recipe="nvfp5"))
    for response in (dialect, nul, unknown):
        assert "Value error" not in response.text, response.text
    assert "auto" in unknown.json()["message"]


def test_an_unreadable_validation_target_is_named_once(env: Env) -> None:
    target = env.root / "nothing-readable"
    target.mkdir()
    response = env.client.post("/v1/validations", json={"path": str(target)})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith(f"cannot validate {target}: ") and detail.count(str(target)) == 1, detail
