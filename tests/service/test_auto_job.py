"""Jobs with `recipe: "auto"`: body validation (422 with a reason) and one real run on a real server.

The run quantizes the tiny Gemma4 MoE at 6.0 effective bits with a real worker process: the job
succeeds, echoes its auto options, and its stored report (the export's quantgate-report.json)
states the achieved effective bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from svc_helpers import FAST_CALIBRATION, wait_terminal

from quantgate.service.schemas import JobCreate

AUTO = {"recipe": "auto", "bits": 6.0, "candidates": ["nvfp4", "fp8"], "method": "gradient", "score_samples": 2}


def _body(**changes: Any) -> dict[str, Any]:
    body = {"source": "org/model", **AUTO, **changes}
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(("changes", "reason"), [
    ({"bits": None}, 'recipe auto needs "bits"'),
    ({"bits": 20}, '"bits" must be in (0, 16]'),
    ({"bits": 0}, '"bits" must be in (0, 16]'),
    ({"candidates": ["nvfp4", "int4"]}, "candidate 'int4' cannot be exported"),
    ({"candidates": ["bf16"]}, '"candidates" needs at least one quantized format'),
    ({"candidates": []}, "at least 1 item"),
    ({"method": "hessian"}, "'gradient' or 'kl_div'"),
    ({"score_samples": 0}, "greater than or equal to 1"),
    ({"recipe": "nvfp4", "candidates": None, "method": None, "score_samples": None}, '"bits" only applies'),
    ({"recipe": "fp8", "bits": None, "candidates": None, "score_samples": None}, '"method" only applies'),
])
def test_invalid_auto_bodies_are_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(_body(**changes))
    assert reason in str(info.value)


def test_valid_auto_bodies() -> None:
    assert JobCreate.model_validate(_body()).bits == 6.0
    minimal = JobCreate.model_validate({"source": "org/model", "recipe": "auto", "bits": 5})
    assert minimal.candidates is None and minimal.method is None    # the exporter's defaults apply
    plain = JobCreate.model_validate({"source": "org/model", "recipe": "nvfp4"})
    assert plain.bits is None


def test_auto_job_runs_and_reports_effective_bits(module_launcher, tmp_path_factory: pytest.TempPathFactory,
                                                  model_root: Path) -> None:
    server = module_launcher(tmp_path_factory.mktemp("auto-job") / "data", roots=[model_root])
    with server.client as client:
        bad = client.post("/v1/jobs", json={"source": str(model_root / "gemma4"), "recipe": "auto"})
        assert bad.status_code == 422 and 'recipe auto needs \\"bits\\"' in bad.text
        created = client.post("/v1/jobs", json={"source": str(model_root / "gemma4"),
                                                "calibration": FAST_CALIBRATION, **AUTO})
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["recipe"] == "auto"
        assert {k: job["params"][k] for k in AUTO if k != "recipe"} == {k: v for k, v in AUTO.items() if k != "recipe"}
        done = wait_terminal(client, job["id"])
        assert done["status"] == "succeeded", done
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        output = Path(done["output_path"])
        assert report == json.loads((output / "quantgate-report.json").read_text())
        auto = report["auto"]
        assert auto["bits_budget"] == 6.0 and auto["effective_bits"] <= 6.0 and auto["method"] == "gradient"
        formats = sorted(s for s in auto["by_scheme"] if s != "BF16")
        expected = "MIXED_PRECISION" if len(formats) > 1 else formats[0]
        assert json.loads((output / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == expected
        events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
        assert any(e["data"].get("effective_bits") == auto["effective_bits"] for e in events)
