"""Data-driven cases for the engines' other formats: GPT-OSS mxfp4, GPTQ, AWQ, CT mxfp4-pack-quantized.

Each case builds a tiny real checkpoint (beyond_builders: real safetensors headers and scale bytes,
published names and relative shapes), breaks it (or not) the way a public report did, and states the
codes that must appear and the verdict each engine gives (formats_beyond_two.md §1, §3-5, §7).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import beyond_builders as bb
import pytest

from quantgate.validators.findings import Severity
from quantgate.validators.report import validate

REPO = Path(__file__).resolve().parents[2]
L, S, W, U = "loads", "fails", "loads_wrong", "unknown"
DYN_L1_MOE = {r"-:model\.layers\.1\.mlp\.experts": {}}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _bf16_layer(n: int) -> list[Callable[[bb.Spec], None]]:
    """Every Linear of layer `n` left BF16 (experts and attention)."""
    return [bb.bf16_experts(n), *(bb.bf16_linear(f"model.layers.{n}.self_attn.{p}") for p in ATTN)]


def _nan_e8m0(n: int) -> bytes:
    return bytes([127]) * (n - 1) + b"\xff"


def _add(name: str, tensor: bb.Tensor) -> Callable[[bb.Spec], None]:
    def mutate(spec: bb.Spec) -> None:
        spec.tensors[name] = tensor
    return mutate


# (id, builder, mutations, codes that must appear, {engine: verdict}); codes prefixed "!" must not appear
CASES: list[tuple[str, Callable[[], bb.Spec], list, list[str], dict[str, str] | None]] = [
    # ---- GPT-OSS mxfp4 (openai/gpt-oss-20b shapes) ----
    ("mxfp4-healthy", bb.gpt_oss_mxfp4, [], ["QG140", "!QG440", "!QG441", "!QG540", "!QG104"], {"vllm": L, "sglang": L}),
    ("mxfp4-no-exclusion-list", bb.gpt_oss_mxfp4, [bb.set_qc(modules_to_not_convert=None)], ["!QG140"],
     {"vllm": L, "sglang": L}),
    ("mxfp4-bf16-experts-kept-config", bb.gpt_oss_mxfp4, [bb.dequantize_mxfp4_experts(1)], ["QG440"],
     {"vllm": S, "sglang": S}),                                       # vllm #45830 / #22380
    ("mxfp4-missing-scales", bb.gpt_oss_mxfp4, [bb.drop("model.layers.0.mlp.experts.down_proj_scales")],
     ["QG441"], {"vllm": W, "sglang": W}),
    ("mxfp4-config-size-mismatch", bb.gpt_oss_mxfp4, [lambda s: s.config.update(intermediate_size=96)],
     ["QG441"], {"vllm": S, "sglang": S}),
    ("mxfp4-e8m0-nan-scale", bb.gpt_oss_mxfp4,
     [bb.set_bytes("model.layers.1.mlp.experts.gate_up_proj_scales", _nan_e8m0)], ["QG540"], {"vllm": W, "sglang": W}),
    ("mxfp4-quantized-attention", bb.gpt_oss_mxfp4,
     [_add("model.layers.0.self_attn.q_proj.weight_scale", ("F32", (), None))], ["QG442"], {"vllm": W, "sglang": W}),
    # ---- GPTQ (Qwen3-30B-A3B-GPTQ-Int4 shapes; hidden/intermediate 128: Marlin MoE supported) ----
    ("gptq-healthy", lambda: bb.qwen3_moe_wna16("gptq"), [], ["!QG240", "!QG104", "!QG307", "!QG303"],
     {"vllm": L, "sglang": L}),
    ("gptq-bf16-experts", lambda: bb.qwen3_moe_wna16("gptq"), [bb.bf16_experts(1)], ["QG240"],
     {"vllm": S, "sglang": W}),                                       # GPTQModel #1455, vllm #28274
    ("gptq-bf16-experts-dynamic-skip", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.bf16_experts(1), bb.set_qc(dynamic=DYN_L1_MOE)], ["QG240"], {"vllm": L, "sglang": W}),
    ("gptq-bf16-experts-moe-wna16-fallback", lambda: bb.qwen3_moe_wna16("gptq", hidden=64),
     [bb.bf16_experts(1), bb.set_qc(dynamic=DYN_L1_MOE)], ["QG240"], {"vllm": S, "sglang": W}),   # vllm PR #39475
    ("gptq-per-expert-dynamic-rule", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.bf16_experts(1), bb.set_qc(dynamic={r"-:.*experts\.\d+\..*": {}})], ["QG240"], {"vllm": S, "sglang": W}),
    ("gptq-quantized-experts-skipped", lambda: bb.qwen3_moe_wna16("gptq"), [bb.set_qc(dynamic=DYN_L1_MOE)],
     ["QG241"], {"vllm": S, "sglang": L}),
    ("gptq-explicit-list-misses-o-proj", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.set_qc(modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                              ["mlp.experts"]])], ["QG243"], {"vllm": S, "sglang": L}),
    ("gptq-explicit-list-partial-qkv", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.set_qc(modules_in_block_to_quantize=["self_attn.q_proj", "self_attn.o_proj", "mlp.experts"])],
     ["QG244"], {"vllm": S, "sglang": L}),                            # vllm #53992
    ("gptq-bf16-o-proj-derived-list", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.bf16_linear("model.layers.0.self_attn.o_proj")], ["QG242"], {"vllm": L, "sglang": W}),
    ("gptq-dynamic-8bit-layer", lambda: bb.qwen3_moe_wna16("gptq", layer_bits={1: 8}),
     [bb.set_qc(dynamic={r"+:model\.layers\.1\..*": {"bits": 8}})], ["!QG303"], {"vllm": L, "sglang": L}),
    ("gptq-8bit-layer-undeclared", lambda: bb.qwen3_moe_wna16("gptq", layer_bits={1: 8}), [], ["QG303"],
     {"vllm": S, "sglang": S}),
    ("gptq-mixed-experts-in-layer", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.bf16_linear(f"model.layers.1.mlp.experts.{x}.{p}") for x in (1, 3) for p in ("gate_proj", "up_proj", "down_proj")],
     ["QG240", "QG403"], {"vllm": S, "sglang": W}),                  # GPTQModel #2221
    ("gptq-dynamic-first-match-wins", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.bf16_experts(1), bb.set_qc(dynamic={r"+:model\.layers\.1\..*": {"bits": 4}, **DYN_L1_MOE})], ["QG240"],
     {"vllm": S, "sglang": W}),
    ("gptq-group-minus-one", lambda: bb.qwen3_moe_wna16("gptq", group=-1), [], ["!QG340", "!QG303"],
     {"vllm": L, "sglang": L}),
    ("gptq-dynamic-group-override", lambda: bb.qwen3_moe_wna16("gptq", layer_group={1: 64}),
     [bb.set_qc(dynamic={r"+:model\.layers\.1\..*": {"group_size": 64}})], ["!QG340"], {"vllm": L, "sglang": L}),
    ("gptq-group-override-missing", lambda: bb.qwen3_moe_wna16("gptq", layer_group={1: 64}), [], ["QG340"],
     {"vllm": S, "sglang": S}),
    ("gptq-input-not-group-aligned", lambda: bb.qwen3_moe_wna16("gptq", hidden=96, group=64), [], ["QG340"],
     {"vllm": S, "sglang": S}),
    ("gptq-group-size-mismatch", lambda: bb.qwen3_moe_wna16("gptq"), [bb.set_qc(group_size=64)], ["QG340"],
     {"vllm": S, "sglang": S}),
    ("gptq-desc-act-without-g-idx", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.set_qc(desc_act=True), bb.drop("model.layers.0.self_attn.q_proj.g_idx")], ["QG341"], {"vllm": W, "sglang": W}),
    ("gptq-dead-expert-zero-scales", lambda: bb.qwen3_moe_wna16("gptq"),
     [bb.set_bytes("model.layers.0.mlp.experts.2.down_proj.scales", bytes)], ["QG541"], {"vllm": W, "sglang": W}),
    ("gptq-lm-head-flag-bf16-lm-head", lambda: bb.qwen3_moe_wna16("gptq"), [bb.set_qc(lm_head=True)], ["QG242"],
     {"vllm": L, "sglang": W}),      # vLLM: derived list lacks lm_head -> UnquantizedEmbeddingMethod
    ("gptq-config-dropped", lambda: bb.qwen3_moe_wna16("gptq"), [lambda s: s.config.pop("quantization_config")],
     ["QG101"], {"vllm": S, "sglang": S}),                            # quantize_config.json only: engines build BF16
    ("gptq-unsupported-bits", lambda: bb.qwen3_moe_wna16("gptq"), [bb.set_qc(bits=5)], ["QG141"],
     {"vllm": S, "sglang": S}),
    ("gptq-3bit-not-modelled", lambda: bb.qwen3_moe_wna16("gptq"), [bb.set_qc(bits=3)], ["QG190", "!QG104"],
     {"vllm": U, "sglang": U}),      # vLLM's plain gptq takes 3 bits; no tensor set here -> `unknown`
    ("gptq-bad-dynamic-regex", lambda: bb.qwen3_moe_wna16("gptq"), [bb.set_qc(dynamic={"-:(": {}})], ["QG103"],
     {"vllm": S, "sglang": S}),
    # ---- AWQ (Qwen3-30B-A3B-AWQ shapes) ----
    ("awq-healthy", lambda: bb.qwen3_moe_wna16("awq"), [], ["!QG240", "!QG104", "!QG303"], {"vllm": L, "sglang": L}),
    ("awq-bf16-experts-derived-list", lambda: bb.qwen3_moe_wna16("awq"), [bb.bf16_experts(1)], ["QG240"],
     {"vllm": S, "sglang": S}),                                       # sglang #19644
    ("awq-bf16-layer-listed", lambda: bb.qwen3_moe_wna16("awq"),
     [*_bf16_layer(1), bb.set_qc(modules_to_not_convert=["model.layers.1.", "mlp.gate"])], ["QG240"],
     {"vllm": L, "sglang": S}),                                       # QuantTrio config, sglang PR #20439
    ("awq-list-without-router", lambda: bb.qwen3_moe_wna16("awq"),
     [*_bf16_layer(1), bb.set_qc(modules_to_not_convert=["model.layers.1."])], ["QG242"],
     {"vllm": S, "sglang": S}),                                       # vLLM qwen3_moe gate takes quant_config
    ("awq-substring-false-positive", lambda: bb.qwen3_moe_wna16("awq", layers=12),
     [*_bf16_layer(1), bb.set_qc(modules_to_not_convert=["model.layers.1", "mlp.gate"])], ["QG241", "QG243"],
     {"vllm": S, "sglang": S}),
    ("awq-bf16-layer-listed-moe-wna16", lambda: bb.qwen3_moe_wna16("awq", hidden=64),
     [*_bf16_layer(1), bb.set_qc(modules_to_not_convert=["model.layers.1.", "mlp.gate"])], ["!QG240"],
     {"vllm": L, "sglang": L}),                                       # moe_wna16 reads the config's list
    ("awq-bf16-o-proj-explicit-list", lambda: bb.qwen3_moe_wna16("awq"),
     [bb.bf16_linear("model.layers.0.self_attn.o_proj"), bb.set_qc(modules_to_not_convert=["mlp.gate"])],
     ["QG242"], {"vllm": S, "sglang": W}),
    ("awq-partial-qkv-listed", lambda: bb.qwen3_moe_wna16("awq"),
     [bb.bf16_linear("model.layers.0.self_attn.q_proj"), bb.set_qc(modules_to_not_convert=["self_attn.q_proj", "mlp.gate"])],
     ["QG244"], {"vllm": S, "sglang": W}),
    ("awq-nan-scales", lambda: bb.qwen3_moe_wna16("awq"),
     [bb.set_bytes("model.layers.0.mlp.experts.2.down_proj.scales", lambda n: b"\x00\x7e" * (n // 2))],
     ["QG540"], {"vllm": W, "sglang": W}),
    ("awq-8bit", lambda: bb.qwen3_moe_wna16("awq"), [bb.set_qc(bits=8)], ["QG141"], {"vllm": S, "sglang": S}),
    # ---- compressed-tensors mxfp4-pack-quantized ----
    ("ct-mxfp4-healthy", bb.qwen3_moe_ct_mxfp4, [], ["!QG307", "!QG104", "!QG303"], {"vllm": L, "sglang": L}),
    ("ct-mxfp4-bf16-experts", bb.qwen3_moe_ct_mxfp4, [bb.ct_bf16_experts(1)], ["QG202"], {"vllm": S, "sglang": S}),
    ("ct-marlin-24-not-modelled", bb.qwen3_moe_ct_mxfp4, [lambda s: s.qc.update(format="marlin-24")],
     ["QG190", "!QG104"], {"vllm": U, "sglang": U}),    # not modelled (format_support.CT_FORMATS): `unknown`
    ("ct-mxfp4-nan-scale", bb.qwen3_moe_ct_mxfp4,
     [bb.set_bytes("model.layers.0.mlp.experts.1.up_proj.weight_scale", _nan_e8m0)], ["QG540"],
     {"vllm": W, "sglang": W}),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("beyond")


@pytest.mark.parametrize("case_id,builder,mutations,codes,verdicts", CASES, ids=[c[0] for c in CASES])
def test_case(root: Path, case_id: str, builder, mutations, codes: list[str], verdicts: dict[str, str] | None) -> None:
    report = validate(str(bb.build(builder(), root / case_id, *mutations)))
    found = {f.code for f in report.findings}
    listing = [f"{f.code} {f.engines} {f.message} | {f.predicted_error}" for f in report.findings]
    for code in codes:
        if code.startswith("!"):
            assert code[1:] not in found, listing
        else:
            assert code in found, listing
    if verdicts is not None:
        assert {e: v["status"] for e, v in report.verdicts.items()} == verdicts, listing
    assert report.quantized and report.dialect and report.scheme


@pytest.mark.parametrize("method,scheme", [("gptq", "GPTQ_INT4"), ("awq", "AWQ_INT4")])
def test_wna16_moe_is_named_quantized(root: Path, method: str, scheme: str) -> None:
    """Issue 10: GPTQ/AWQ MoE checkpoints used to come out "not quantized, loads"."""
    report = validate(str(bb.write(bb.qwen3_moe_wna16(method), root / f"named-{method}")))
    assert (report.quantized, report.dialect, report.scheme) == (True, method, scheme)
    assert report.summary["by_kind"]["expert"]["quantized"] == 2 * 4 * 3
    assert "QG100" not in {f.code for f in report.findings}


def test_mxfp4_layout_expands_fused_blocks(root: Path) -> None:
    report = validate(str(bb.write(bb.gpt_oss_mxfp4(), root / "layout")))
    assert (report.dialect, report.scheme) == ("mxfp4", "MXFP4")
    assert report.summary["by_kind"]["expert"]["quantized"] == 2 * 4 * 3     # layers x experts x (gate, up, down)
    assert report.summary["by_kind"]["attention"]["unquantized"] == 2 * 4


def test_vllm_keyerror_names_the_moe_layer(root: Path) -> None:
    report = validate(str(bb.build(bb.qwen3_moe_wna16("gptq"), root / "keyerror", bb.bf16_experts(1))))
    assert report.verdicts["vllm"]["reason"] == "QG240: KeyError: 'model.layers.1.mlp.experts.w13_weight'"
    hit = next(f for f in report.findings if f.code == "QG240" and f.engines == ("vllm",))
    assert hit.severity is Severity.ERROR and len(hit.modules) == 12


def test_header_only_never_imports_torch(root: Path) -> None:
    targets = [bb.build(bb.qwen3_moe_wna16("gptq"), root / "nt-gptq", bb.bf16_experts(1)),
               bb.write(bb.gpt_oss_mxfp4(), root / "nt-oss")]
    code = ("import sys\nfrom service.cli import main\n"
            f"rcs = [main(['validate', t, '--format', 'json']) for t in {[str(t) for t in targets]!r}]\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', rcs, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "NOTORCH [1, 0]" in proc.stderr, proc.stderr


def test_substring_index_agrees_with_vllms_any_in() -> None:
    """The indexed test is vLLM's `any(entry in prefix for entry in entries)`, only faster."""
    import random

    from quantgate.validators.dialects_wna16 import SubstringIndex, substring_hit

    rng = random.Random(0)
    parts = ["model", "layers", "1", "10", "mlp", "experts", "gate", "gate_proj", "self_attn", "q_proj", "."]
    entries = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    index = SubstringIndex(entries)
    for _ in range(500):
        prefix = ".".join(rng.choice(parts) for _ in range(rng.randint(1, 7)))
        assert (index.hit(prefix) is not None) == (substring_hit(prefix, entries) is not None), prefix
