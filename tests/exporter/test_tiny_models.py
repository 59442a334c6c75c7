"""quantgate.exporter.testkit.tiny_models: real, deterministic, Hub-shaped tiny checkpoints for every test suite."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from quantgate.exporter.testkit.tiny_models import TINY_ARCH_TABLE, TINY_ARCHS, build_tiny, tiny_config
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Kind, build_layout
from quantgate.validators.safetensors_header import read_header

HUB_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_builds_a_hub_shaped_checkpoint_that_transformers_loads_and_runs(
    arch: str, tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model(arch)
    assert {p.name for p in path.iterdir()} == HUB_FILES
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [TINY_ARCH_TABLE[arch].model_cls]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Quantize the experts, then validate.", return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.get_text_config().vocab_size
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 2)
    not_bf16 = {n for n, t in read_header(path / "model.safetensors").tensors.items() if t.dtype != "BF16"}
    assert all(".mlp.gate." in n for n in not_bf16), not_bf16  # only DeepSeek's router stays F32 by design


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_model: Callable[..., Path]) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model("llama"))
    text = "héllo 東京 ✓ 2688 weight_scale_2"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<bos><|user|>hi<eos><|assistant|>"
    generation = json.loads((tiny_model("llama") / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_builds_are_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_tiny("qwen3_moe", tmp_path / "a", seed=7)
    second = build_tiny("qwen3_moe", tmp_path / "b", seed=7)
    other = build_tiny("qwen3_moe", tmp_path / "c", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(first / name) == digest(second / name), name
    assert digest(first / "model.safetensors") != digest(other / "model.safetensors")
    state = torch.random.get_rng_state()
    build_tiny("llama", tmp_path / "d", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is untouched


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_linear_is_nvfp4_compatible(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(arch)
    layout = build_layout(
        read_header(path / "model.safetensors").tensors, json.loads((path / "config.json").read_text())
    )
    linears = [
        m
        for m in layout.modules.values()
        if m.kind not in (Kind.NORM, Kind.EMBEDDING) and m.role != "conv" and m.in_features is not None
    ]
    assert linears and all(m.in_features % 16 == 0 for m in linears), [
        (m.name, m.in_features) for m in linears if m.in_features % 16
    ]


SIZES = dict(hidden=128, layers=3, experts=4, intermediate=64, moe_intermediate=32, vocab=2048)
# arch -> config attributes the generic size names must reach (None: the arch has no such size)
SIZE_KEYS = {
    "gemma4": dict(
        hidden_size=128,
        num_hidden_layers=3,
        num_experts=4,
        intermediate_size=64,
        moe_intermediate_size=32,
        vocab_size=2048,
        vocab_size_per_layer_input=2048,
    ),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, intermediate_size=64),
    "qwen3_5_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=4, intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=4, moe_intermediate_size=32, intermediate_size=64),
    "gpt_oss": dict(num_local_experts=4, intermediate_size=32),
    "llama4": dict(num_local_experts=4, intermediate_size=32, intermediate_size_mlp=64),
    "llama": dict(intermediate_size=64, hidden_size=128),
}


@pytest.mark.parametrize("arch", list(SIZE_KEYS))
def test_size_overrides_reach_each_architectures_config(arch: str) -> None:
    config = tiny_config(arch, **SIZES).get_text_config()
    assert {k: getattr(config, k) for k in SIZE_KEYS[arch]} == SIZE_KEYS[arch]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 3, 2048)
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == 3


def test_benchmark_sized_gemma4_moe(tmp_path: Path) -> None:
    path = build_tiny(
        "gemma4",
        tmp_path / "bench",
        hidden=512,
        layers=4,
        experts=8,
        intermediate=1024,
        moe_intermediate=512,
        vocab=8192,
    )
    tensors = read_header(path / "model.safetensors").tensors
    params = sum(t.numel for t in tensors.values())
    assert 30e6 < params < 40e6  # the ~36M-parameter Gemma4 MoE the export benchmarks use
    assert tensors["model.layers.3.experts.gate_up_proj"].shape == (8, 1024, 512)
    assert json.loads((path / "config.json").read_text())["layer_types"][-1] == "full_attention"


def test_multimodal_wrapper_keeps_special_tokens_inside_the_vocab() -> None:
    config = tiny_config("gemma4_mm", vocab=1024)
    assert config.image_token_id < config.get_text_config().vocab_size == 1024
    assert config.vision_config is not None and config.vision_config.hidden_size == 64


def test_sharded_build_writes_an_index(tmp_path: Path) -> None:
    path = build_tiny("llama", tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}


def test_bad_requests_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown tiny architecture 'gemma5'.*gemma4"):
        build_tiny("gemma5", tmp_path / "x")
    with pytest.raises(UsageError, match="vocab 100 is too small"):
        tiny_config("llama", vocab=100)
