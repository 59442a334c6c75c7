"""`POST /v1/validations` on a checkpoint whose quant_method quantgate does not model: verdict
`unknown` per engine, `unknown_engines` in the response, `ok` without `strict` and not ok with it,
and the stored HTML report saying so."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from svc_helpers import API_TOKEN


@pytest.fixture(scope="module")
def server_and_model(module_launcher, tmp_path_factory, tiny_model):
    root = Path(os.path.realpath(tmp_path_factory.mktemp("unknown-root")))
    model = root / "quark-llama"
    shutil.copytree(tiny_model("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "quark", "export": {}, "global_quant_config": {}}
    (model / "config.json").write_text(json.dumps(config))
    server = module_launcher(tmp_path_factory.mktemp("unknown-data"), roots=[root], token=API_TOKEN,
                             args=["--max-concurrency", "0"])
    with server.client as client:
        yield client, model


def test_unknown_verdicts_through_the_api(server_and_model) -> None:
    client, model = server_and_model
    response = client.post("/v1/validations", json={"path": str(model)})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ok"] is True and body["unknown_engines"] == ["sglang", "vllm"]
    assert {v["status"] for v in body["verdicts"].values()} == {"unknown"}
    assert "quark" in body["verdicts"]["vllm"]["reason"]
    assert [f["code"] for f in body["report"]["findings"]] == ["QG190"]
    stored = client.get(f"/v1/validations/{body['id']}")
    assert stored.json() == body
    page = client.get(f"/v1/validations/{body['id']}", headers={"Accept": "text/html"})
    assert "unknown: not modelled" in page.text and "#6a4c93" in page.text

    strict = client.post("/v1/validations", json={"path": str(model), "strict": True})
    assert strict.status_code == 201 and strict.json()["ok"] is False
    assert strict.json()["unknown_engines"] == ["sglang", "vllm"]
    metrics = client.get("/metrics").text
    assert 'quantgate_validation_verdicts_total{engine="vllm",verdict="unknown"}' in metrics
