"""Tiny, real transformers checkpoints for tests, `make demo` and benchmarks, built offline.

`build_tiny("gemma4", out_dir)` instantiates the real transformers model class from a small config
(hidden 64, 2 layers, 8 experts, head_dim 16, vocab 1000: every in_features a multiple of 16 so
NVFP4 applies everywhere), initialises it deterministically from `seed`, saves it with the default
`save_pretrained` (the on-disk format the Hub uses, e.g. Mixtral's `block_sparse_moe.experts.{e}.w1`),
and adds a byte-level BPE tokenizer trained with `tokenizers`, a chat template, a generation config
and a model card, so the directory looks like a Hub repo. Recipes: `reference/lab_transformers.md`.

Sizes are overridable with generic names (`hidden`, `layers`, `experts`, `intermediate`,
`moe_intermediate`, `vocab`, `heads`, `kv_heads`, `head_dim`) that each architecture maps to its own
config keys; any other keyword is passed to the config as is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import torch

from quantgate.validators.errors import UsageError

log = logging.getLogger(__name__)

#: Generic size names -> config keys, shared by most architectures (rows override entries).
DEFAULT_SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size",),
    "layers": ("num_hidden_layers",),
    "experts": ("num_experts",),
    "intermediate": ("intermediate_size",),
    "moe_intermediate": ("moe_intermediate_size",),
    "vocab": ("vocab_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
}

COMMON: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
_GEMMA4_TEXT: dict[str, Any] = dict(
    COMMON, tie_word_embeddings=True, intermediate_size=128, head_dim=16, global_head_dim=16,
    hidden_size_per_layer_input=0, vocab_size_per_layer_input=1000,  # 0 disables per-layer embeddings
    enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=128, sliding_window=64,
)
_LINEAR_ATTENTION: dict[str, Any] = dict(
    head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4,
)
# A vision tower small enough to cost nothing, so vision and projector modules exist on disk.
_GEMMA4_VISION: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
    head_dim=16, position_embedding_size=256,
)
# Multimodal special tokens sit at the top of the vocabulary: id = vocab_size - offset.
_GEMMA4_MM_TOKEN_OFFSETS: dict[str, int] = dict(
    image_token_id=1, boi_token_id=2, eoi_token_id=3, video_token_id=4, boa_token_id=5, eoa_token_index=6,
    audio_token_id=7,
)


@dataclass(frozen=True)
class TinyArch:
    """One buildable architecture: transformers class names plus the config that makes it tiny."""

    config_cls: str  # attribute of the `transformers` package
    model_cls: str
    kwargs: Mapping[str, Any]  # config kwargs (of the text config for wrappers)
    size_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # overrides of DEFAULT_SIZE_KEYS
    layer_types: tuple[str, ...] = ()  # cycled over the layers; the last layer gets the last entry
    text_config_cls: str | None = None  # multimodal wrapper: kwargs build this, passed as text_config
    wrapper_kwargs: Mapping[str, Any] = field(default_factory=dict)
    token_offsets: Mapping[str, int] = field(default_factory=dict)  # wrapper special ids from the top
    note: str = ""


TINY_ARCH_TABLE: dict[str, TinyArch] = {
    "gemma4": TinyArch(
        "Gemma4TextConfig", "Gemma4ForCausalLM", _GEMMA4_TEXT,
        size_keys={"vocab": ("vocab_size", "vocab_size_per_layer_input")},
        layer_types=("sliding_attention", "full_attention"),
        note="fused experts at layers.N.experts [E,2I,H]/[E,H,I], router.proj, parallel dense mlp, tied"),
    "gemma4_mm": TinyArch(
        "Gemma4Config", "Gemma4ForConditionalGeneration", _GEMMA4_TEXT,
        size_keys={"vocab": ("vocab_size", "vocab_size_per_layer_input")},
        layer_types=("sliding_attention", "full_attention"), text_config_cls="Gemma4TextConfig",
        wrapper_kwargs=dict(vision_config=_GEMMA4_VISION, audio_config=None),
        token_offsets=_GEMMA4_MM_TOKEN_OFFSETS,
        note="model.language_model.* + a 1-layer vision tower and embed_vision projector"),
    "qwen3_moe": TinyArch(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(COMMON, intermediate_size=128, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
             head_dim=16)),
    "qwen3_5_moe": TinyArch(
        "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
        dict(COMMON, **_LINEAR_ATTENTION, moe_intermediate_size=128, shared_expert_intermediate_size=128,
             num_experts=8, num_experts_per_tok=2),
        size_keys={"intermediate": ("shared_expert_intermediate_size",)},
        layer_types=("linear_attention", "full_attention"),
        note="shared_expert + shared_expert_gate, gated-delta linear attention"),
    "mixtral": TinyArch(
        "MixtralConfig", "MixtralForCausalLM",
        dict(COMMON, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
        size_keys={"experts": ("num_local_experts",), "moe_intermediate": ("intermediate_size",)},
        note="saved as block_sparse_moe.experts.{e}.w1/w2/w3"),
    "deepseek_v3": TinyArch(
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(COMMON, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=128,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
             qk_nope_head_dim=16, v_head_dim=16),
        size_keys={"experts": ("n_routed_experts",), "kv_heads": ("num_key_value_heads",),
                   "head_dim": ("qk_nope_head_dim", "v_head_dim")},
        note="MLA (kv_heads must equal heads), shared experts, layer 0 dense"),
    "gpt_oss": TinyArch(
        "GptOssConfig", "GptOssForCausalLM",
        dict(COMMON, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
             sliding_window=64),
        size_keys={"experts": ("num_local_experts",), "moe_intermediate": ("intermediate_size",)},
        note="fused transposed + interleaved experts with biases, mlp.router"),
    "llama4": TinyArch(
        "Llama4TextConfig", "Llama4ForCausalLM",
        dict(COMMON, intermediate_size=128, intermediate_size_mlp=256, head_dim=16, num_local_experts=8,
             num_experts_per_tok=1, interleave_moe_layer_step=1),
        size_keys={"experts": ("num_local_experts",), "intermediate": ("intermediate_size_mlp",),
                   "moe_intermediate": ("intermediate_size",)},
        note="fused transposed experts [E,H,2I], feed_forward.router, shared_expert"),
    "llama": TinyArch(
        "LlamaConfig", "LlamaForCausalLM", dict(COMMON, intermediate_size=128, head_dim=16),
        note="dense reference"),
}
TINY_ARCHS: tuple[str, ...] = tuple(TINY_ARCH_TABLE)

# A small fixed corpus: enough merges for a realistic tokenizer, trained in well under a second.
_CORPUS_LINES = (
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps BF16 weights to NVFP4 blocks of sixteen values with an FP8 scale.",
    "Mixture-of-experts layers route every token to the top k experts of the layer.",
    "vLLM and SGLang load safetensors checkpoints and fuse q, k and v projections.",
    "def forward(self, x):\n    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 128 448 2688. Unicode: héllo, naïve, 東京, ✓.",
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MIN_VOCAB = 512  # 256 byte-level symbols + specials + merges must fit


def _transformers() -> Any:
    import transformers  # deferred: importing it costs seconds

    return transformers


def _arch(arch: str) -> TinyArch:
    try:
        return TINY_ARCH_TABLE[arch]
    except KeyError:
        known = ", ".join(TINY_ARCHS)
        raise UsageError(f"unknown tiny architecture {arch!r}; choose one of {known}") from None


def _layer_types(pattern: tuple[str, ...], num_layers: int) -> list[str]:
    """Cycle `pattern` over the layers; the last layer always gets the pattern's last entry."""
    types = list(islice(cycle(pattern), num_layers))
    if types:
        types[-1] = pattern[-1]
    return types


def _text_kwargs(spec: TinyArch, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Base kwargs with the generic size overrides mapped onto this architecture's config keys."""
    size_keys = {**DEFAULT_SIZE_KEYS, **spec.size_keys}
    kwargs = dict(spec.kwargs)
    for key, value in overrides.items():
        for config_key in size_keys.get(key, (key,)):
            kwargs[config_key] = value
    if spec.layer_types and "layer_types" not in overrides:
        kwargs["layer_types"] = _layer_types(spec.layer_types, kwargs["num_hidden_layers"])
    if kwargs["vocab_size"] < MIN_VOCAB:
        raise UsageError(f"vocab {kwargs['vocab_size']} is too small for the byte-level tokenizer; "
                         f"use >= {MIN_VOCAB}")
    return kwargs


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The transformers config object `build_tiny` would use (overrides as in the module docstring)."""
    spec = _arch(arch)
    tf = _transformers()
    kwargs = _text_kwargs(spec, overrides)
    if spec.text_config_cls is None:
        return getattr(tf, spec.config_cls)(**kwargs)
    text_config = getattr(tf, spec.text_config_cls)(**kwargs)
    vocab = kwargs["vocab_size"]
    wrapper = {name: vocab - offset for name, offset in spec.token_offsets.items()}
    tie = kwargs["tie_word_embeddings"]
    wrapper_cls = getattr(tf, spec.config_cls)
    return wrapper_cls(text_config=text_config, tie_word_embeddings=tie, **spec.wrapper_kwargs, **wrapper)


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process and vocabulary size (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for _ in range(50) for line in _CORPUS_LINES], trainer)
    return tok.to_str()


def save_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) into `out_dir`."""
    from tokenizers import Tokenizer

    tf = _transformers()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """save_pretrained draws a tqdm bar per call; tests and demos build dozens of models."""
    tl = _transformers().utils.logging
    enabled = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tl.enable_progress_bar()


def _model_card(arch: str, spec: TinyArch, seed: int, dtype: torch.dtype, config: Any) -> str:
    return (
        f"---\nlibrary_name: transformers\nlicense: apache-2.0\ntags: [quantgate, tiny, test]\n---\n"
        f"# tiny-{arch}\n\nRandomly initialised `{spec.model_cls}` built by `quantgate.exporter.testkit.tiny_models` "
        f"(seed {seed}, {str(dtype).removeprefix('torch.')}) for tests. {spec.note}\n\n"
        f"```json\n{json.dumps(config.to_diff_dict(), indent=1, sort_keys=True, default=str)}\n```\n"
    )


def build_tiny(arch: str, out_dir: Path | str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               max_shard_size: int | str | None = None, with_tokenizer: bool = True,
               **overrides: Any) -> Path:
    """Build, initialise (deterministically from `seed`) and save a tiny `arch` model into `out_dir`.

    `max_shard_size` (e.g. "200KB") writes a sharded checkpoint with model.safetensors.index.json.
    `with_tokenizer=False` leaves only what `save_pretrained` writes (no tokenizer files), as a user
    who saves just the model does.
    Returns the directory. Offline; about 0.1 s per model once transformers is imported.
    """
    spec = _arch(arch)
    config = tiny_config(arch, **overrides)
    model_cls = getattr(_transformers(), spec.model_cls)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, dtype=dtype).eval()
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with _quiet_progress_bars():
        model.save_pretrained(out, **save_kwargs)
    if with_tokenizer:
        save_tokenizer(out, config.get_text_config().vocab_size)
    (out / "README.md").write_text(_model_card(arch, spec, seed, dtype, config), encoding="utf-8")
    log.debug("built tiny %s (%d params) in %s", arch, sum(p.numel() for p in model.parameters()), out)
    return out
