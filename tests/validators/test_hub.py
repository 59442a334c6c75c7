"""Hub checkpoints against a real local HTTP server that speaks the Hub API (fake_hub.py).

huggingface_hub does the HTTP; the server serves real safetensors files. No test leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_hub import FakeHub, FakeHubServer, commit_sha
from safetensors.numpy import save_file
from safetensors_factory import tiny_tensors, write_checkpoint, write_index

from quantgate.validators.checkpoint import open_checkpoint
from quantgate.validators.errors import CheckpointReadError

TOKEN = "hf_test_secret_token_0123456789"


def _with_big_weight(seed: int) -> dict[str, np.ndarray]:
    tensors = tiny_tensors(seed=seed)
    tensors["model.layers.0.mlp.down_proj.weight"] = np.ones((256, 512), dtype=np.float32)   # 512 KiB
    return tensors


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    sharded = root / "org" / "sharded" / "main"
    write_checkpoint(sharded, _with_big_weight(0), shards=3,
                     config={"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    (sharded / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    (sharded / "tokenizer.json").write_text("{}")
    write_checkpoint(root / "org" / "single" / "main", _with_big_weight(1), shards=1, index=False)
    write_checkpoint(root / "org" / "revs" / "main", {"a": np.zeros(4, np.float32)}, shards=1, index=False)
    write_checkpoint(root / "org" / "revs" / "v2", {"b": np.zeros(4, np.float32)}, shards=1, index=False)
    write_checkpoint(root / "org" / "gated" / "main", tiny_tensors(), shards=1, index=False)
    broken = root / "org" / "broken" / "main"
    weight_map = write_checkpoint(broken, tiny_tensors(), shards=3)
    shards = sorted(set(weight_map.values()))
    (broken / shards[0]).unlink()                                          # index names a missing shard
    data = (broken / shards[1]).read_bytes()
    (broken / shards[1]).write_bytes(data[:-4])                            # truncated shard
    write_index(broken, {**weight_map, "evil": "../../../etc/passwd"})     # hostile entry
    pickles = root / "org" / "pickles" / "main"
    pickles.mkdir(parents=True)
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x02")
    return root


@pytest.fixture()
def hub(hub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    with FakeHubServer(hub_root, gated={"org/gated": TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield server


def _header_sizes(root: Path) -> dict[str, int]:
    return {p.name: struct.unpack("<Q", p.read_bytes()[:8])[0] for p in root.glob("*.safetensors")}


def test_sharded_repo_reads_headers_only(hub: FakeHub, hub_root: Path) -> None:
    local = open_checkpoint(str(hub_root / "org" / "sharded" / "main"))
    view = open_checkpoint("org/sharded")

    assert view.kind == "hub" and view.problems == [] and view.root is None
    assert view.revision == commit_sha("org/sharded", "main")
    assert view.tensors == local.tensors and view.files == local.files
    assert view.config == local.config and view.hf_quant_config == local.hf_quant_config
    assert view.index == local.index
    assert view.other_files() == ["config.json", "hf_quant_config.json", "tokenizer.json"]
    # Every byte of every shard that crossed the wire was length prefix or JSON header.
    sizes = _header_sizes(hub_root / "org" / "sharded" / "main")
    served: dict[str, int] = {}
    for request in hub.resolve_bytes_served():
        name = request.path.rsplit("/", 1)[1]
        assert request.status == 206 and request.range is not None
        last = int(request.range.removeprefix("bytes=").split("-")[1])
        assert last < 8 + sizes[name], f"{name}: range {request.range} reaches tensor data"
        served[name] = served.get(name, 0) + request.body_bytes
    assert served == {name: 8 + n for name, n in sizes.items()}
    with pytest.raises(CheckpointReadError, match="not downloaded"):
        view.read_values("model.layers.0.mlp.down_proj.weight")


def test_single_file_repo_and_hf_scheme(hub: FakeHub) -> None:
    view = open_checkpoint("hf://org/single")
    assert view.files == ["model.safetensors"] and view.problems == [] and view.index is None
    assert view.tensors["model.layers.0.mlp.down_proj.weight"].shape == (256, 512)
    assert sum(r.body_bytes for r in hub.resolve_bytes_served()) < 4096


def test_revision_is_honoured(hub: FakeHub) -> None:
    assert set(open_checkpoint("org/revs").tensors) == {"a"}
    v2 = open_checkpoint("hf://org/revs@v2")
    assert set(v2.tensors) == {"b"} and v2.revision == commit_sha("org/revs", "v2")
    assert set(open_checkpoint("org/revs", revision=commit_sha("org/revs", "v2")).tensors) == {"b"}
    # every file request was pinned to the commit, not to the moving branch name
    resolved = [r.path for r in hub.log if "/resolve/" in r.path]
    assert resolved and all(commit_sha("org/revs", "v2") in p or commit_sha("org/revs", "main") in p
                            for p in resolved)
    with pytest.raises(CheckpointReadError, match="revision 'nope' not found"):
        open_checkpoint("org/revs@nope")


def test_missing_repo_and_non_safetensors_repo(hub: FakeHub) -> None:
    with pytest.raises(CheckpointReadError) as caught:
        open_checkpoint("org/does-not-exist")
    assert "repo org/does-not-exist not found on http://127.0.0.1" in str(caught.value)
    assert "no local path of that name" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(CheckpointReadError, match="no .safetensors weights"):
        open_checkpoint("org/pickles")


def test_gated_repo_needs_the_token_and_never_echoes_it(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointReadError, match="gated") as caught:
        open_checkpoint("org/gated", token="hf_wrong_token_abcdef")
    assert "hf_wrong_token_abcdef" not in str(caught.value)
    assert set(open_checkpoint("org/gated", token=TOKEN).tensors) == set(tiny_tensors())
    monkeypatch.setenv("HF_TOKEN", TOKEN)                               # picked up at call time
    assert open_checkpoint("org/gated").problems == []
    assert any(r.authorization == f"Bearer {TOKEN}" for r in hub.log)


def test_broken_repo_keeps_reading_what_it_can(hub: FakeHub) -> None:
    view = open_checkpoint("org/broken")
    by_code = {p.code: p for p in view.problems}
    assert sorted(by_code) == ["QG601", "QG602", "QG605"]
    assert "truncated: header says" in by_code["QG602"].message
    assert "never fetched" in by_code["QG605"].message
    assert len(view.files) == 1 and view.tensors
    assert not any("passwd" in r.path for r in hub.log)


def test_unreachable_endpoint_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    with socket.socket() as s:                                          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointReadError, match=r"cannot reach the Hub at http://127\.0\.0\.1"):
        open_checkpoint("org/anything")


def test_shard_added_to_a_hub_repo_without_index_entry(hub: FakeHub, hub_root: Path) -> None:
    stray = hub_root / "org" / "sharded" / "main" / "stray.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(stray))
    try:
        view = open_checkpoint("org/sharded")
    finally:
        stray.unlink()
    assert [p.code for p in view.problems] == ["QG604"] and "x" not in view.tensors


def test_server_ignoring_range_requests_still_gives_the_headers(hub: FakeHub, hub_root: Path) -> None:
    hub.ranges = False                                                  # every GET answers 200 + the file
    view = open_checkpoint("org/sharded")
    assert view.problems == [] and view.tensors == open_checkpoint(str(hub_root / "org" / "sharded" / "main")).tensors


def test_tiny_shard_on_the_hub_is_a_qg602(hub: FakeHub, hub_root: Path) -> None:
    repo = hub_root / "org" / "tiny" / "main"
    repo.mkdir(parents=True)
    (repo / "model.safetensors").write_bytes(b"\x01\x02")
    view = open_checkpoint("org/tiny")
    assert [p.code for p in view.problems] == ["QG602"] and "too small" in view.problems[0].message
