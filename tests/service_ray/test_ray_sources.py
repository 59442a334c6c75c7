"""A Ray job on a Qwen3-MoE saved without tokenizer files quantizes with random calibration (issue 11 §1):
transformers builds an empty tokenizer for it, which random calibration must never consult.

Runs like the other Ray tests: a Ray head in a private network namespace, `quantgate serve --executor
ray`, and a real worker quantizing the model on the Ray node.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ray_netns import Namespace, RayServer, start_ray_server
from svc_helpers import FAST_CALIBRATION, wait_terminal

PORT = 8001   # the namespace is shared by the session's Ray test modules


@pytest.fixture(scope="module")
def server(ray_namespace: Namespace, tmp_path_factory: pytest.TempPathFactory,
           tiny_model: Callable[..., Path]) -> Iterator[tuple[RayServer, Path]]:
    root = tmp_path_factory.mktemp("ray-sources")
    shutil.copytree(tiny_model("qwen3_moe", with_tokenizer=False), root / "qwen3-no-tokenizer")
    tmp = tmp_path_factory.mktemp("ray-sources-server")
    handle = start_ray_server(ray_namespace, tmp / "data", tmp, roots=[root], port=PORT)
    try:
        yield handle, root
    finally:
        handle.stop()


def test_tokenizerless_qwen3_moe_quantizes_on_ray(server) -> None:
    handle, root = server
    with handle.client as client:
        created = client.post("/v1/jobs", json={"source": str(root / "qwen3-no-tokenizer"), "recipe": "nvfp4",
                                                "gpus": 0, "calibration": FAST_CALIBRATION})
        assert created.status_code == 201, created.text
        done = wait_terminal(client, created.json()["id"])
    assert done["status"] == "succeeded", done
    output = Path(done["output_path"])
    assert done["validation"]["ok"] is True and (output / "hf_quant_config.json").is_file()
    stats = json.loads((output / "calibration.json").read_text())["metadata"]
    assert stats["data"] == "random" and stats["model_class"] == "Qwen3MoeForCausalLM"
    worker_log = (handle.data_dir / "jobs" / done["id"] / "worker.log").read_text()
    assert "--- attempt 1 on Ray node" in worker_log and "no usable token ids" not in worker_log
