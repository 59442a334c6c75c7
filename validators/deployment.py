"""Deployment shape: does a checkpoint still load when split over N GPUs (tensor / expert parallel)?

Header-only: the sizes come from config.json (attention heads, KV heads) and from each module's logical
[out, in] and stored scheme (its scale block). For one shape (`tp`, `ep`) `shape_problems` lists every
reason the engines refuse it, with the engine's own message:

* attention heads: vLLM `config/model.py ModelConfig.verify_with_parallel_config` raises "Total number
  of attention heads (H) must be divisible by tensor parallel size (N)."; SGLang asserts
  `total_num_heads % tp_size == 0` in every attention module (`sglang/srt/models/llama.py`).
* KV heads: `QKVParallelLinear` (vllm/model_executor/layers/linear.py, SGLang's port) divides kv by tp,
  or replicates kv when tp >= kv, via `divide` -> "AssertionError: X is not divisible by Y".
* sharded dims: column-parallel out / row-parallel in must divide by tp (`divide`, same message).
* scale blocks per rank: FP8 128x128 blocks (`fp8_utils.validate_fp8_block_shape` /
  `validate_fp8_block_shape_moe`), NVFP4 16-element groups (`modelopt.py`: "Unsupported model when in
  features size is not multiple of 16"; MoE: vllm#49949), MXFP8 32 (`modelopt.py`), int4 groups.
* expert parallelism (`--enable-expert-parallel`, EP size = TP size here): experts are not split along
  the intermediate dim; SGLang asserts num_experts % ep_size == 0 (`engine_facts`), vLLM spreads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantgate.validators.errors import UsageError
from quantgate.validators.layout_table import TEXT_CONFIG_KEYS

if TYPE_CHECKING:
    from quantgate.validators.rules._context import Analysis, ModClass
    from quantgate.validators.schemes import SchemeSpec

#: shapes probed when no --tensor-parallel-size is given (the report says where loading stops)
PROBE_SIZES: tuple[int, ...] = (2, 4, 8, 16)
MAX_PARALLEL = 1 << 12
#: layout role -> how vLLM / SGLang shard the module under tensor parallelism
PARALLEL_STYLE: dict[str, str] = {
    "q": "column", "k": "column", "v": "column", "qkv": "column", "q_b": "column", "kv_b": "column",
    "gate": "column", "up": "column", "gate_up": "column",
    "o": "row", "down": "row",
}
HEAD_ROLES = frozenset({"q", "k", "v", "qkv", "o"})      # their sharding follows the head checks
SHARDED_KINDS = frozenset({"attention", "mlp", "shared_expert", "expert"})
VLLM_DIVIDE = "vllm/distributed/utils.py ensure_divisibility"


@dataclass(frozen=True)
class Deployment:
    """The serving shape: `--tensor-parallel-size` and `--enable-expert-parallel` (EP size = TP size)."""

    tensor_parallel_size: int | None = None
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_PARALLEL):
            raise UsageError(f"--tensor-parallel-size must be an integer between 1 and {MAX_PARALLEL}, got {tp!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"tensor_parallel_size": self.tensor_parallel_size, "expert_parallel": self.expert_parallel}

    def label(self, size: int | None = None) -> str:
        tp = size if size is not None else self.tensor_parallel_size
        return f"TP={tp}{' with expert parallelism' if self.expert_parallel else ''}"


@dataclass(frozen=True)
class ShapeProblem:
    """One reason a shape does not load: the modules concerned and the engine's message."""

    what: str                       # heads | kv_heads | divide | block | experts
    message: str
    error: str
    modules: tuple[str, ...]
    engines: tuple[str, ...] = ("vllm", "sglang")


def _config_int(config: Mapping[str, Any] | None, *keys: str) -> int | None:
    top = config if isinstance(config, Mapping) else {}
    scopes = [top[k] for k in TEXT_CONFIG_KEYS if isinstance(top.get(k), Mapping)] + [top]
    for scope in scopes:
        for key in keys:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _alignment(spec: "SchemeSpec") -> tuple[int, int]:
    """(out, in) elements one scale covers: FP8 blocks 128x128 (native fp8: its `weight_block_size`),
    NVFP4 1x16, MXFP8 1x32, int4 1xgroup."""
    if spec.weight_block:
        return spec.weight_block
    row = max(spec.in_divisor, 1)
    col = max(spec.out_divisor, 1)
    if "BLOCK" in spec.name.upper() and spec.group_size:
        row = col = spec.group_size
    return col, row


def _block_error(spec: "SchemeSpec", where: str, per: int, block: int) -> str:
    name = spec.name.upper()
    if where == "expert":
        if "MXFP8" in name:
            return f"ValueError: MXFP8 MoE requires intermediate_size_per_partition divisible by {block}, got {per}."
        if _alignment(spec)[0] > 1:
            return (f"ValueError: The output_size of gate's and up's weight = {per} is not divisible by weight "
                    f"quantization block_n = {block}.")
        return (f"RuntimeError: intermediate_size_per_partition {per} splits a {block}-element scale group "
                "(vllm#49949: the MoE GEMM rejects the shard)")
    if where == "column":
        return (f"ValueError: Weight output_partition_size = {per} is not divisible by weight quantization "
                f"block_n = {block}.")
    if _alignment(spec)[0] > 1:
        return f"ValueError: Weight input_size_per_partition = {per} is not divisible by weight quantization block_k = {block}."
    if "NVFP4" in name:
        return "ValueError: Unsupported model when in features size is not multiple of 16"
    return f"ValueError: input_size_per_partition {per} is not a multiple of the {block}-element quantization group"


def _head_problems(config: Mapping[str, Any] | None, tp: int) -> list[ShapeProblem]:
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        return []
    out: list[ShapeProblem] = []
    if heads % tp:
        message = f"{heads} attention heads do not split over {tp} ranks"
        out.append(ShapeProblem("heads", message, f"ValueError: Total number of attention heads ({heads}) must be "
                                f"divisible by tensor parallel size ({tp}).", ("config.json:num_attention_heads",),
                                ("vllm",)))
        out.append(ShapeProblem("heads", message, "AssertionError (sglang/srt/models/*.py attention: assert "
                                "self.total_num_heads % tp_size == 0)", ("config.json:num_attention_heads",),
                                ("sglang",)))
    mla = _config_int(config, "kv_lora_rank") is not None
    kv = _config_int(config, "num_key_value_heads", "num_kv_heads")
    if kv is not None and not mla:
        if kv >= tp and kv % tp:
            out.append(ShapeProblem("kv_heads", f"{kv} KV heads do not split over {tp} ranks",
                                    f"AssertionError: {kv} is not divisible by {tp}", ("config.json:num_key_value_heads",)))
        elif kv < tp and tp % kv:
            out.append(ShapeProblem("kv_heads", f"{kv} KV heads cannot be replicated evenly over {tp} ranks",
                                    f"AssertionError: {tp} is not divisible by {kv}", ("config.json:num_key_value_heads",)))
    return out


def _sharded_dim(cls: "ModClass", style: str) -> int | None:
    m = cls.rep
    return m.out_features if style == "column" else m.in_features


def shape_problems(a: "Analysis", config: Mapping[str, Any] | None, tp: int, ep: bool,
                   ep_needs_divisible: Mapping[str, bool]) -> list[ShapeProblem]:
    """Every reason the shape (tp, ep) fails to load, from config and module shapes alone."""
    if tp <= 1:
        return []
    problems = _head_problems(config, tp)
    heads_ok = not problems
    divide: dict[tuple[int, int], list[str]] = {}
    blocks: dict[str, tuple[str, list[str]]] = {}
    for cls in a.classes:
        style = PARALLEL_STYLE.get(cls.role or "")
        if style is None or cls.kind not in SHARDED_KINDS:
            continue
        expert = cls.kind == "expert"
        if expert and ep:
            continue                    # whole experts per rank: no intermediate split
        dim = _sharded_dim(cls, style)
        if not dim:
            continue
        if cls.role in HEAD_ROLES and not heads_ok:
            continue                    # the head check already explains it
        if dim % tp:
            if cls.role not in HEAD_ROLES:
                divide.setdefault((dim, tp), []).extend(cls.names)
            continue
        spec = cls.state.scheme
        if spec is None:
            continue
        col, row = _alignment(spec)
        per = dim // tp
        where = "expert" if expert else style
        if expert:                      # FP8 blocks check I/tp on both sides; groups only along `in`
            block = col if col > 1 else (row if style == "row" else 1)
        else:
            block = col if style == "column" else row
        if block > 1 and per % block:
            error = _block_error(spec, where, per, block)
            blocks.setdefault(error, (f"{spec.name} {where}-parallel shards of {per} are not multiples of the "
                                      f"{block}-element scale block", []))[1].extend(cls.names)
    for (dim, size), names in sorted(divide.items()):
        problems.append(ShapeProblem("divide", f"dimension {dim} does not split over {size} ranks",
                                     f"AssertionError: {dim} is not divisible by {size}", tuple(names)))
    for error, (message, names) in sorted(blocks.items()):
        problems.append(ShapeProblem("block", message, error, tuple(names)))
    n = a.layout.num_experts
    if ep and n and n % tp:
        engines = tuple(e for e, needs in ep_needs_divisible.items() if needs)
        if engines:
            problems.append(ShapeProblem("experts", f"{n} experts do not split over {tp} expert-parallel ranks",
                                         "AssertionError: assert self._num_global_routed % storage_ep_size == 0",
                                         ("config.json:num_experts",), engines))
    return problems
