"""Sources a new user brings, through the real HTTP server and real worker processes (issue 11):

* a Qwen3-MoE saved by `save_pretrained` without tokenizer files (transformers builds an empty
  tokenizer for it) quantizes with random calibration, and the report names the final output;
* an already-quantized source (our own NVFP4 export) fails as `bad_input` with the reason, not as an
  `internal_error` with transformers' load errors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from svc_helpers import FAST_CALIBRATION, wait_terminal


@pytest.fixture(scope="module")
def sources_root(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Path]) -> Path:
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(tiny_model("qwen3_moe", with_tokenizer=False), root / "qwen3-no-tokenizer")
    return root


@pytest.fixture(scope="module")
def server(module_launcher, tmp_path_factory: pytest.TempPathFactory, sources_root: Path):
    handle = module_launcher(tmp_path_factory.mktemp("sources-e2e") / "data", roots=[sources_root])
    with handle.client as client:
        yield handle, client


def _run(client, source: Path) -> dict:
    created = client.post("/v1/jobs", json={"source": str(source), "recipe": "nvfp4",
                                            "calibration": FAST_CALIBRATION})
    assert created.status_code == 201, created.text
    return wait_terminal(client, created.json()["id"])


def test_tokenizerless_qwen3_moe_job_succeeds_then_its_export_is_refused_at_submit(
    server, sources_root: Path
) -> None:
    handle, client = server
    source = sources_root / "qwen3-no-tokenizer"
    assert not list(source.glob("tokenizer*"))
    done = _run(client, source)
    assert done["status"] == "succeeded", done
    output = Path(done["output_path"])
    assert done["validation"]["ok"] is True and (output / "hf_quant_config.json").is_file()
    assert json.loads((output / "quantgate-report.json").read_text())["target"] == str(output)
    stats = json.loads((output / "calibration.json").read_text())["metadata"]
    assert stats["data"] == "random" and stats["model_class"] == "Qwen3MoeForCausalLM"

    exported = sources_root / "qwen3-nvfp4"          # the export, copied under the allowed root
    shutil.copytree(output, exported)
    # refused at the door (the submit-time header pass), with the worker's own message
    refused = client.post("/v1/jobs", json={"source": str(exported), "recipe": "nvfp4",
                                            "calibration": FAST_CALIBRATION})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == (
        "source is already quantized (ModelOpt NVFP4): quantize the original BF16 checkpoint")
    assert "Traceback" not in handle.log_text()
