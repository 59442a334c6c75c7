"""CheckpointView over local directories and files: integrity problems, configs, read_values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from safetensors_factory import (
    INDEX_FILE,
    CountingFile,
    entry,
    raw_file,
    tiny_tensors,
    write_checkpoint,
    write_index,
)

from quantgate.validators import checkpoint as ckpt
from quantgate.validators.checkpoint import CheckpointView, open_checkpoint
from quantgate.validators.errors import CheckpointReadError, UsageError
from quantgate.validators.hub import parse_hub_target
from quantgate.validators.values import e4m3fn_table

Sharded = tuple[Path, dict[str, np.ndarray], dict[str, str]]   # root, tensors, weight_map


def codes(view: CheckpointView) -> list[str]:
    return sorted(p.code for p in view.problems)


@pytest.fixture()
def sharded(tmp_path: Path) -> Sharded:
    tensors = tiny_tensors()
    root = tmp_path / "ckpt"
    weight_map = write_checkpoint(root, tensors, shards=3)
    (root / "tokenizer.json").write_text("{}")
    (root / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    return root, tensors, weight_map


def test_sharded_directory_with_index(sharded: Sharded) -> None:
    root, tensors, weight_map = sharded
    view = open_checkpoint(str(root))
    assert view.kind == "directory" and view.problems == []
    assert set(view.tensors) == set(tensors)
    assert {n: t.file for n, t in view.tensors.items()} == weight_map
    assert view.files == sorted(set(weight_map.values()))
    assert view.config["model_type"] == "llama"
    assert view.hf_quant_config == {"quantization": {"quant_algo": "NVFP4"}}
    assert view.index["weight_map"] == weight_map
    assert view.other_files() == ["config.json", "hf_quant_config.json", "tokenizer.json"]


def test_directory_without_index_and_single_file(tmp_path: Path) -> None:
    tensors = tiny_tensors(seed=1)
    write_checkpoint(tmp_path / "noindex", tensors, shards=2, index=False)
    view = open_checkpoint(str(tmp_path / "noindex"))
    assert view.problems == [] and view.index is None and set(view.tensors) == set(tensors)

    write_checkpoint(tmp_path / "single", tensors, shards=1, index=False)
    view = open_checkpoint(str(tmp_path / "single" / "model.safetensors"))
    assert view.kind == "file" and view.files == ["model.safetensors"] and view.problems == []
    assert view.config is not None and set(view.tensors) == set(tensors)


def test_missing_and_corrupt_shards_do_not_hide_the_rest(sharded: Sharded) -> None:
    root, _, weight_map = sharded
    shards = sorted(set(weight_map.values()))
    (root / shards[0]).unlink()
    data = (root / shards[1]).read_bytes()
    (root / shards[1]).write_bytes(data[: len(data) - 3])         # truncated
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG601", "QG602"]
    qg602 = next(p for p in view.problems if p.code == "QG602")
    assert "truncated: header says" in qg602.message and qg602.files == (shards[1],)
    assert set(view.tensors) == {n for n, f in weight_map.items() if f == shards[2]}
    assert view.files == [shards[2]]


def test_index_disagreeing_with_shards(sharded: Sharded) -> None:
    root, _, weight_map = sharded
    shards = sorted(set(weight_map.values()))
    edited = dict(weight_map)
    edited["model.layers.9.ghost.weight"] = shards[0]                # listed but absent
    dropped = next(iter(edited))
    moved = next(n for n, f in edited.items() if f == shards[1])
    del edited[dropped]                                             # present but unlisted
    edited[moved] = shards[2]                                       # listed in the wrong shard
    write_index(root, edited)
    view = open_checkpoint(str(root))
    messages = " | ".join(p.message for p in view.problems)
    assert codes(view) == ["QG603", "QG603", "QG607"]      # listed-but-absent has its own (error) code
    assert "ghost" in messages and dropped in messages and moved in messages
    assert next(p for p in view.problems if p.code == "QG607").files == ("model.layers.9.ghost.weight",)


def test_stray_shard_and_duplicate_tensor(sharded: Sharded) -> None:
    root, tensors, _ = sharded
    save_file({"lm_head.weight": tensors["lm_head.weight"]}, str(root / "extra.safetensors"))
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG604"] and "extra.safetensors" in view.problems[0].message
    assert "extra.safetensors" not in view.files
    (root / INDEX_FILE).unlink()                                    # now every file is read
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG603"] and "stored in 2 shards" in view.problems[0].message


@pytest.mark.parametrize("hostile", [
    "/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", "..\\outside.safetensors",
    "C:\\Windows\\x.safetensors", "\\\\server\\share\\x.safetensors", "model.bin", "", "./model.safetensors",
    7, ["model-00001-of-00003.safetensors"], None,
])
def test_hostile_index_entries_are_refused_never_opened(sharded: Sharded, hostile: object,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root, tensors, weight_map = sharded
    save_file({"secret": np.zeros(2, np.float32)}, str(root.parent / "outside.safetensors"))
    edited = dict(weight_map)
    edited["secret"] = hostile
    write_index(root, edited)
    opened: list[str] = []
    real_read_header = ckpt.read_header
    monkeypatch.setattr(ckpt, "read_header", lambda p, **kw: opened.append(str(p)) or real_read_header(p, **kw))
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG605"] and "refused" in view.problems[0].message
    assert "secret" not in view.tensors and set(view.tensors) == set(tensors)
    assert all(Path(p).parent == root for p in opened)


def test_symlinked_shards(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    root = tmp_path / "ckpt"
    weight_map = write_checkpoint(elsewhere, tiny_tensors(), shards=2)
    root.mkdir()
    for name in set(weight_map.values()) | {INDEX_FILE, "config.json"}:
        (root / name).symlink_to(elsewhere / name)
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG605"] * 4 and view.tensors == {} and view.config is None
    assert all("outside the checkpoint directory" in p.message for p in view.problems)
    view = open_checkpoint(str(root), allowed_roots=[elsewhere])
    assert view.problems == [] and len(view.tensors) == len(weight_map)


def test_hf_cache_snapshot_links_into_its_blob_store(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    source = tmp_path / "src"
    weight_map = write_checkpoint(source, tiny_tensors(), shards=2)
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(source))):
        (repo / "blobs" / f"blob{i}").write_bytes((source / name).read_bytes())
        (snapshot / name).symlink_to(Path("../../blobs") / f"blob{i}")
    view = open_checkpoint(str(snapshot))
    assert view.problems == [] and len(view.tensors) == len(weight_map)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b"{not json", "not valid JSON"),
    ("config.json", b"[1]", "must hold a JSON object"),
    ("hf_quant_config.json", b"\xff\xfe", "not UTF-8"),
    ("config.json", b"[" * 100_000, "nested too deeply"),
])
def test_bad_config_files_become_qg606(sharded: Sharded, name: str, content: bytes, message: str) -> None:
    root, tensors, _ = sharded
    (root / name).write_bytes(content)
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG606"] and message in view.problems[0].message
    assert len(view.tensors) == len(tensors)


def test_oversized_config_and_broken_index(sharded: Sharded, monkeypatch: pytest.MonkeyPatch) -> None:
    root, tensors, _ = sharded
    monkeypatch.setattr(ckpt, "MAX_CONFIG_BYTES", 10)
    view = open_checkpoint(str(root))
    assert codes(view) == ["QG606", "QG606"] and "10-byte limit" in view.problems[0].message
    monkeypatch.undo()
    (root / INDEX_FILE).write_text('{"weight_map": ["not", "a", "map"]}')
    view = open_checkpoint(str(root))                               # falls back to the shards on disk
    assert codes(view) == ["QG606"] and len(view.tensors) == len(tensors) and view.index is None
    (root / INDEX_FILE).write_text('{"weight_map": ')
    assert codes(open_checkpoint(str(root))) == ["QG606"]


def test_unreadable_targets_raise_one_line_errors(tmp_path: Path) -> None:
    cases = {
        str(tmp_path / "nope"): "no such file or directory",
        str(tmp_path): "no .safetensors files",
    }
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    (tmp_path / "notes.txt").write_text("hi")
    cases[str(tmp_path / "notes.txt")] = "not a .safetensors file"
    for target, message in cases.items():
        with pytest.raises(CheckpointReadError) as caught:
            open_checkpoint(target)
        text = str(caught.value)
        assert message in text or "pickle" in text, text
        assert "\n" not in text
    with pytest.raises(CheckpointReadError, match="never loads pickles"):
        open_checkpoint(str(tmp_path))


def test_corrupt_single_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "model.safetensors", {"w": entry("F32", [4], 0, 16)}, 8)
    view = open_checkpoint(str(path))
    assert codes(view) == ["QG602"] and view.tensors == {}


def test_read_values_decodes_every_scale_dtype(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen) * 3
    tensors = {
        "bf16": base.to(torch.bfloat16), "f16": base.to(torch.float16), "f32": base, "f64": base.double(),
        "e4m3": base.to(torch.float8_e4m3fn), "e5m2": base.to(torch.float8_e5m2),
        "u8": torch.arange(24, dtype=torch.uint8).reshape(4, 6), "i8": torch.arange(-12, 12, dtype=torch.int8),
        "i32": torch.arange(-5, 5, dtype=torch.int32), "i64": torch.tensor([2**40, -3]),
        "scalar": torch.tensor(0.0123, dtype=torch.float32),
    }
    torch_save(tensors, str(tmp_path / "model.safetensors"))
    view = open_checkpoint(str(tmp_path))
    for name, tensor in tensors.items():
        values = view.read_values(name)
        assert values.dtype == np.float64 and values.shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(values, tensor.double().numpy(), err_msg=name)


def test_e4m3_table_matches_torch_bit_for_bit() -> None:
    torch = pytest.importorskip("torch")
    expected = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    table = e4m3fn_table()
    np.testing.assert_array_equal(table, expected)
    assert np.isnan(table[0x7F]) and np.isnan(table[0xFF]) and table[0x7E] == 448.0


def test_read_values_reads_only_that_tensor_and_refuses_big_reads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    big = 2**27                                                     # 128 MiB of F32, stored as a hole
    path = raw_file(tmp_path / "model.safetensors", {"big": entry("F32", [big // 4], 0, big),
                                                     "scale": entry("F32", [], big, big + 4)})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + big)
        f.seek(0, os.SEEK_END)
        f.write(np.float32(0.5).tobytes())
    view = open_checkpoint(str(tmp_path))
    reads: list[int] = []
    monkeypatch.setattr(ckpt, "open", lambda p, mode: CountingFile(p, mode, reads), raising=False)
    assert float(view.read_values("scale")) == 0.5
    assert reads == [4]
    with pytest.raises(CheckpointReadError, match="read_values limit"):
        view.read_values("big")
    with pytest.raises(CheckpointReadError, match="no tensor named"):
        view.read_values("absent")
    assert reads == [4]


def test_target_kind_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hub_target("org/name") == ("org/name", None)
    assert parse_hub_target("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_target("hf://org/name@abc123") == ("org/name", "abc123")
    assert parse_hub_target("org/name", revision="dev") == ("org/name", "dev")
    for local in ("./org/name", "/org/name", "~/org/name", "..\\x", "C:/models/x", "a/b/c", "plain"):
        assert parse_hub_target(local) is None, local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_target("org/name") is None                    # an existing path wins
    with pytest.raises(CheckpointReadError, match="not a Hub reference"):
        parse_hub_target("hf://not-a-repo")
    with pytest.raises(UsageError, match="conflicts"):
        parse_hub_target("org/x@a", revision="b")


def test_offline_mode_forbids_hub_access(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointReadError, match="HF_HUB_OFFLINE.*local copy"):
        open_checkpoint("some-org/some-model")
