"""Source reading: lazy per-tensor reads, per-expert slices of fused tensors, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate.exporter.source import open_source, slice_fused
from quantgate.validators.errors import CheckpointReadError, UnsupportedArchitectureError
from quantgate.validators.layout import FusedSlice, Kind


@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma4", "gpt_oss", "llama4"])
def test_tensor_reads_equal_safetensors(tiny_model, arch: str) -> None:
    src = open_source(str(tiny_model(arch)))
    reference: dict[str, torch.Tensor] = {}
    for f in src.path.glob("*.safetensors"):
        reference.update(load_file(str(f)))
    assert set(reference) == set(src.view.tensors)
    for name, tensor in reference.items():
        assert torch.equal(src.tensor(name), tensor), name


@pytest.mark.parametrize("arch", ["gemma4", "gpt_oss", "llama4"])
def test_fused_experts_sliced_per_expert(tiny_model, arch: str) -> None:
    """Virtual per-expert weights are the [out, in] matrices the experts forward multiplies by."""
    src = open_source(str(tiny_model(arch)))
    experts = [m for m in src.layout.by_kind(Kind.EXPERT) if m.fused is not None]
    assert experts
    for module in experts:
        fused = src.tensor(module.fused.tensor)[module.fused.expert]
        assert torch.equal(src.expert_tensor(module.fused.tensor, module.fused.expert), fused)
        matrix = fused.t() if module.fused.transposed else fused
        if module.fused.rows is not None:
            start, stop = module.fused.rows
            matrix = matrix[(start // (stop - start))::2] if module.fused.interleaved else matrix[start:stop]
        weight = src.module_weight(module)
        assert torch.equal(weight, matrix)
        assert tuple(weight.shape) == (module.out_features, module.in_features)


def test_slice_fused_layouts() -> None:
    """Rows of [2I, H] (gate first), transposed [H, 2I], and GPT-OSS interleaved columns."""
    i, h = 3, 4
    gate = torch.arange(i * h, dtype=torch.float32).reshape(i, h)
    up = -gate - 1
    plain = torch.cat([gate, up])                                   # [2I, H]
    inter = torch.stack([gate, up], dim=1).reshape(2 * i, h)        # rows g0 u0 g1 u1 ...
    for stored, transposed, interleaved in ((plain, False, False), (plain.t(), True, False),
                                            (inter.t(), True, True)):
        for rows, want in (((0, i), gate), ((i, 2 * i), up)):
            got = slice_fused(stored, FusedSlice("t", 0, rows, transposed, interleaved))
            assert torch.equal(got, want) and got.is_contiguous()


def test_missing_path_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointReadError, match="no such file or directory"):
        open_source(str(tmp_path / "nope"))


def test_pickle_only_checkpoint_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointReadError, match="pickle"):
        open_source(str(tmp_path))


def test_directory_without_weights_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointReadError, match="no .safetensors"):
        open_source(str(tmp_path))


def test_unrecognised_architecture_refused(tmp_path: Path) -> None:
    save_file({"encoder.block.0.conv.weight": torch.zeros(4, 4, 3), "decoder.head.weight": torch.zeros(8, 4)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["WeirdNet"], "model_type": "weird"}))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture"):
        open_source(str(tmp_path))


def test_single_safetensors_file_and_sharded_directory(tiny_model, tmp_path: Path) -> None:
    source = tiny_model("qwen3_moe")
    single = open_source(str(next(source.glob("*.safetensors"))))
    assert single.path == source and single.layout.by_kind(Kind.EXPERT)
    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    tensors = load_file(str(next(sharded.glob("*.safetensors"))))
    (next(sharded.glob("*.safetensors"))).unlink()
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    src = open_source(str(sharded))
    for name in (names[0], names[-1]):
        assert torch.equal(src.tensor(name), tensors[name])


def test_other_files_lists_tokenizer_and_generation_config(tiny_model) -> None:
    src = open_source(str(tiny_model("qwen3_moe")))
    files = src.other_files()
    assert any(f.startswith("tokenizer") for f in files)
    assert not any(f.endswith(".safetensors") for f in files)
