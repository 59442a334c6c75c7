"""`quantgate quantize --push-to-hub`: pull a tiny model from a local fake Hub, quantize, validate, push.

The fake Hub (tests/validators/fake_hub_write.py) runs on 127.0.0.1 and implements the upload calls
huggingface_hub makes (create_repo, preupload, LFS batch + PUT, commit, list commits). Real CLI
subprocesses, real exports: files and card arrive byte-identical, a re-run does not commit twice,
a rejected token exits 2, a failed validation is never pushed, and no token leaks anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validators"))
from fake_hub_write import WritableFakeHub, WritableFakeHubServer  # noqa: E402

from quantgate.exporter.model_card import CardFacts, render_card  # noqa: E402
from quantgate.validators import __version__  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WRITE_TOKEN = "hf_WRITEtokenNEVERprinted0123456789abcd"
SOURCE = "tiny-org/gemma4-tiny"
TARGET = "my-org/gemma4-tiny-NVFP4"
CALIB = ("--calib-samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Iterator[WritableFakeHub]:
    root = tmp_path_factory.mktemp("hub")
    shutil.copytree(tiny_model("gemma4"), root / SOURCE / "main")
    with WritableFakeHubServer(root, WRITE_TOKEN) as server:
        yield server


def _cli(hub: WritableFakeHub, tmp: Path, *args: str, token: str = WRITE_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp / "hf-home")}
    return subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", *args], capture_output=True, text=True,
                          check=False, cwd=REPO, env=env, timeout=600)


def _remote(hub: WritableFakeHub, repo: str, branch: str = "main") -> Path:
    return hub.root / repo / branch


def test_push_uploads_the_export_and_its_card_once(hub: WritableFakeHub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _cli(hub, tmp_path, SOURCE, "--recipe", "nvfp4", "--out", str(out), "--device", "cpu", *CALIB,
                "--push-to-hub", TARGET, "--progress", "json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    uploads = [e for e in events if e.get("stage") == "upload"]
    assert uploads and uploads[-1]["fraction"] == 1.0 and uploads[-1]["data"]["created"] is True
    push = events[-1]
    assert push["event"] == "push" and push["repo_id"] == TARGET and push["created"] is True
    assert hub.commit_ids(TARGET)[0] == push["commit"] and len(hub.commit_ids(TARGET)) == 2  # initial + ours
    assert push["commit"] in proc.stderr and push["repo_url"] == f"{hub.url}/{TARGET}"

    remote = _remote(hub, TARGET)
    local_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "model.safetensors" in local_files or any(f.endswith(".safetensors") for f in local_files)
    for rel in local_files:
        assert (remote / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert any(hub.blobs), "the safetensors went through the LFS transfer"

    card = (remote / "README.md").read_text(encoding="utf-8")
    expected = render_card(out, CardFacts(repo_id=TARGET, revision=None, source=SOURCE, source_revision=None,
                                          recipe="nvfp4", version=__version__))
    assert card == expected
    print("\n----- model card pushed to the local Hub -----\n" + card + "----- end of card -----")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == SOURCE and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] in ("text-generation", "image-text-to-text")
    assert {"nvfp4", "modelopt", "quantgate"} <= set(meta["tags"])
    report = json.loads((out / "quantgate-report.json").read_text())
    for kind, counts in report["summary"]["by_kind"].items():
        if counts["quantized"] or counts["excluded"]:
            assert f"| {kind} |" in card
    assert f"| **all** | **{report['summary']['totals']['quantized']}**" in card
    assert "| vLLM | **loads** |" in card and "| SGLang | **loads** |" in card
    assert f"vllm serve {TARGET}\n" in card and f"python -m sglang.launch_server --model-path {TARGET}\n" in card
    assert "4 samples of 32 tokens from random token ids" in card and f"quantgate {__version__}" in card
    for text in (proc.stdout, proc.stderr, card, *(p.read_text(errors="replace") for p in remote.glob("*.json"))):
        assert WRITE_TOKEN not in text

    # the pushed repo validates from the Hub, header-only, like any other
    check = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "validate", TARGET, "--format", "json"],
                           capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE_TOKEN, "HF_HUB_OFFLINE": "0",
                                "HF_HOME": str(tmp_path / "hf-home-2")})
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["verdicts"]["vllm"]["status"] == "loads"

    # the same command again (a retry): same export, same card -> the marker is found, no second commit
    again = _cli(hub, tmp_path, SOURCE, "--recipe", "nvfp4", "--out", str(tmp_path / "out2"), "--device", "cpu",
                 *CALIB, "--push-to-hub", TARGET, "--progress", "json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.splitlines()[-1])
    assert second["created"] is False and second["commit"] == push["commit"], second
    assert len(hub.commit_ids(TARGET)) == 2 and "already pushed" in again.stderr


def test_push_to_a_new_private_branch(hub: WritableFakeHub, tmp_path: Path) -> None:
    repo = "my-org/gemma4-tiny-FP8"
    proc = _cli(hub, tmp_path, SOURCE, "--recipe", "fp8", "--out", str(tmp_path / "o"), "--device", "cpu", *CALIB,
                "--push-to-hub", repo, "--private", "--push-revision", "fp8-static")
    assert proc.returncode == 0, proc.stderr
    assert repo in hub.private and (_remote(hub, repo, "fp8-static") / "README.md").is_file()
    assert not (_remote(hub, repo, "main") / "README.md").exists(), "main is left alone"
    card = (_remote(hub, repo, "fp8-static") / "README.md").read_text()
    assert f"vllm serve {repo} --revision fp8-static" in card and "\n- \"fp8\"\n" in card


def test_rejected_token_exits_2_and_never_shows_it(hub: WritableFakeHub, tmp_path: Path) -> None:
    bad = "hf_BADtokenTHATtheHUBrejects0123456789"
    out = tmp_path / "o"
    proc = _cli(hub, tmp_path, SOURCE, "--recipe", "nvfp4", "--out", str(out), "--device", "cpu", *CALIB,
                "--push-to-hub", "my-org/refused", token=bad)
    assert proc.returncode == 2, proc.stderr
    assert "rejected the token (HTTP 401" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr and bad not in proc.stderr + proc.stdout
    assert not (hub.root / "my-org" / "refused").exists()
    assert (out / "quantgate-report.json").is_file(), "the validated export is kept"


def test_bad_push_options_exit_2_before_any_work(hub: WritableFakeHub, tmp_path: Path) -> None:
    proc = _cli(hub, tmp_path, SOURCE, "--recipe", "nvfp4", "--out", str(tmp_path / "o"), "--push-to-hub", "no-slash")
    assert proc.returncode == 2 and "not a Hub repo id" in proc.stderr
    proc = _cli(hub, tmp_path, SOURCE, "--recipe", "nvfp4", "--out", str(tmp_path / "o"), "--private")
    assert proc.returncode == 2 and "need --push-to-hub" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_failed_validation_is_never_pushed(hub: WritableFakeHub, tmp_path: Path, tiny_model) -> None:
    # a config that claims one more decoder layer than the weights hold: the export fails validation
    stale = hub.root / "tiny-org" / "gemma4-stale" / "main"
    shutil.copytree(tiny_model("gemma4"), stale)
    config = json.loads((stale / "config.json").read_text())
    config["num_hidden_layers"] += 1
    if config.get("layer_types"):
        config["layer_types"].append(config["layer_types"][-1])
    (stale / "config.json").write_text(json.dumps(config))
    proc = _cli(hub, tmp_path, "tiny-org/gemma4-stale", "--recipe", "nvfp4", "--out", str(tmp_path / "o"),
                "--device", "cpu", *CALIB, "--push-to-hub", "my-org/never")
    assert proc.returncode == 1 and "validation found" in proc.stderr
    assert not (hub.root / "my-org" / "never").exists()
    assert not any("/my-org/never" in served.path for served in hub.log)
