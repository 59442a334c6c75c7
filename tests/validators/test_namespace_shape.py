"""QG701 (tensor names outside the model's name space), QG711/QG712 (tensor / expert parallel shape)
and QG607 (an index entry naming a tensor absent from its shard), on real tiny checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import qc_builders as qb
from safetensors import safe_open
from safetensors.torch import save_file

from quantgate.exporter.testkit.tiny_models import TINY_ARCHS
from quantgate.validators.deployment import Deployment
from quantgate.validators.errors import UsageError
from quantgate.validators.findings import Severity
from quantgate.validators.report import validate


def _rename(old: str, new: str) -> Callable[[qb.QCheckpoint], None]:
    def mutate(qc: qb.QCheckpoint) -> None:
        for name in [n for n in qc.tensors if n.startswith(old)]:
            qc.tensors[new + name[len(old):]] = qc.tensors.pop(name)
    return mutate


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("ns")
    counter = iter(range(10_000))
    return lambda arch, mutate=None, tiny=None, **kw: qb.build(
        tiny_model(arch, **(tiny or {})), root / f"{arch}-{next(counter)}", mutate=mutate, **kw)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_healthy_tiny_models_lie_in_their_name_space(tiny_model, arch: str) -> None:
    report = validate(str(tiny_model(arch)))
    assert not [f for f in report.findings if f.code in ("QG701", "QG711", "QG607")]


# (arch, mutation, {engine: (verdict, text in the predicted error)})
NAME_CASES = [
    # llm-compressor #2568: a doubled multimodal wrapper
    ("gemma4_mm", _rename("model.language_model.", "model.language_model.language_model."),
     {"vllm": ("fails", "There is no module or parameter named 'language_model.model.language_model'"),
      "sglang": ("loads_wrong", "matches no parameter")}),
    # a multimodal wrapper on a text-only architecture
    ("qwen3_moe", _rename("model.", "model.language_model."),
     {"vllm": ("fails", "'model.language_model' in Qwen3MoeForCausalLM"), "sglang": ("loads_wrong", "skips it")}),
    # a hand-written vLLM loader: params_dict[name] -> KeyError
    ("deepseek_v3", _rename("model.layers.", "model.model.layers."),
     {"vllm": ("fails", "KeyError: 'model.model.layers."), "sglang": ("loads_wrong", "skips it")}),
    # a wrong top-level module
    ("mixtral", _rename("lm_head.", "transformer.lm_head."),
     {"vllm": ("fails", "named 'transformer'"), "sglang": ("loads_wrong", "matches no parameter")}),
]


@pytest.mark.parametrize("arch,mutate,expected", NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_names_outside_the_model(export, arch: str, mutate, expected: dict) -> None:
    report = validate(str(export(arch, mutate)))
    hits = [f for f in report.findings if f.code == "QG701"]
    assert hits and all(f.severity is Severity.ERROR for f in hits), [f.message for f in report.findings]
    for engine, (status, text) in expected.items():
        mine = next(f for f in hits if engine in f.engines)
        assert report.verdicts[engine]["status"] == status, report.verdicts
        assert text in mine.predicted_error, mine.predicted_error


def test_gemma4_text_accepts_the_wrapper_vllm_maps(tiny_model, tmp_path: Path) -> None:
    """vLLM 0.32's Gemma4ForCausalLM maps `model.language_model.` to `model.` (gemma4.py): no QG701,
    while the same wrapper on Qwen3-MoE (no such mapper) is QG701 (NAME_CASES)."""
    from quantgate.validators.engine_facts import NAME_MAPPER, fact

    src = tiny_model("gemma4")
    out = tmp_path / "wrapped"
    out.mkdir()
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for f in sorted(src.glob("*.safetensors")) for k, v in _load(f).items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((src / "config.json").read_text())
    report = validate(str(out), engines=("vllm",))
    assert not [f for f in report.findings if f.code == "QG701"]
    mapper = fact("vllm", NAME_MAPPER, "Gemma4ForCausalLM")
    assert mapper.map("model.vision_tower.encoder.layers.0.mlp.up_proj.weight") is None


# ---- deployment shape ----------------------------------------------------------------------------------
WIDE = dict(heads=16, kv_heads=4, moe_intermediate=96)      # heads split to 16; experts 96/4 = 24 (not % 16)

SHAPE_CASES = [
    # (tiny overrides, deployment, expected QG711 errors: what substring -> engines)
    (None, Deployment(8), {"Total number of attention heads (4) must be divisible by tensor parallel size (8).":
                           {"vllm"}, "assert self.total_num_heads % tp_size == 0": {"sglang"}}),
    (None, Deployment(2), {}),
    (None, Deployment(3), {"Total number of attention heads (4)": {"vllm"}}),
    (WIDE, Deployment(2), {}),
    (WIDE, Deployment(4), {"splits a 16-element scale group": {"vllm", "sglang"}}),
    (WIDE, Deployment(4, expert_parallel=True), {}),             # whole experts per rank: no split
    (WIDE, Deployment(16, expert_parallel=True), {"_num_global_routed % storage_ep_size": {"sglang"}}),
    (WIDE, Deployment(5), {"Total number of attention heads (16)": {"vllm"},
                           "AssertionError: 96 is not divisible by 5": {"vllm", "sglang"}}),
]


@pytest.mark.parametrize("tiny,deployment,expected", SHAPE_CASES)
def test_parallel_shape(export, tiny, deployment: Deployment, expected: dict) -> None:
    report = validate(str(export("qwen3_moe", tiny=tiny)), deployment=deployment)
    hits = [f for f in report.findings if f.code == "QG711"]
    assert all(f.severity is Severity.ERROR for f in hits)
    for text, engines in expected.items():
        match = [f for f in hits if text in f.predicted_error or text in f.message]
        assert match, [f"{f.message} | {f.predicted_error}" for f in hits]
        assert set(match[0].engines) == engines
        for e in engines:
            assert report.verdicts[e]["status"] == "fails"
    if not expected:
        assert hits == [] and {v["status"] for v in report.verdicts.values()} == {"loads"}
    assert report.to_dict()["deployment"] == deployment.to_dict()
    assert not [f for f in report.findings if f.code == "QG712"]      # the limit info only without a shape


def test_limits_reported_without_a_shape(export) -> None:
    report = validate(str(export("qwen3_moe", tiny=WIDE)))
    info = {(f.details["size"], f.details["expert_parallel"]): f for f in report.findings if f.code == "QG712"}
    assert info[(4, False)].severity is Severity.INFO and "scale group" in info[(4, False)].predicted_error
    assert (16, True) in info and "storage_ep_size" in info[(16, True)].predicted_error
    assert "enable expert parallelism" in info[(4, False)].fix            # EP goes further (16)
    assert report.ok and report.to_dict()["deployment"] is None
    heads_only = [f for f in validate(str(export("qwen3_moe"))).findings if f.code == "QG712"]
    assert len(heads_only) == 1 and "expert parallelism" not in heads_only[0].fix   # EP cannot split heads


@pytest.mark.parametrize("bad", [0, -2, True, 1 << 20])
def test_bad_tensor_parallel_size(bad) -> None:
    with pytest.raises(UsageError):
        Deployment(bad)


# ---- QG607: the index names a tensor its shard does not hold -------------------------------------------

def _drop_from_shard(root: Path, suffix: str) -> str:
    """Delete the first `*suffix` tensor from its shard, keeping the index entry."""
    index = json.loads((root / qb.INDEX_FILE).read_text())
    name = next(n for n in sorted(index["weight_map"]) if n.endswith(suffix))
    shard = root / index["weight_map"][name]
    with safe_open(str(shard), "pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys() if k != name}
    save_file(kept, str(shard))
    return name


@pytest.mark.parametrize("suffix,quantized", [(".input_scale", True), ("norm.weight", False)])
def test_index_entry_absent_from_shard_is_an_error(export, tiny_model, tmp_path: Path, suffix: str,
                                                   quantized: bool) -> None:
    if quantized:
        root = export("qwen3_moe", shards=2)
    else:                                   # an unquantized sharded model: vLLM's strict loaded-weights check
        root = tmp_path / "bf16"
        src = tiny_model("llama")
        qb.write_shards({k: v for f in sorted(src.glob("*.safetensors"))
                         for k, v in _load(f).items()}, root.mkdir() or root, 2)
        (root / "config.json").write_text((src / "config.json").read_text())
    name = _drop_from_shard(root, suffix)
    report = validate(str(root))
    hit = next(f for f in report.findings if f.code == "QG607")
    assert hit.severity is Severity.ERROR and name in hit.modules
    if quantized:
        assert {v["status"] for v in report.verdicts.values()} == {"loads_wrong"}
    else:
        assert report.verdicts["vllm"]["status"] == "fails"
        assert "Following weights were not initialized" in report.verdicts["vllm"]["reason"]
        assert report.verdicts["sglang"]["status"] == "loads_wrong"


def _load(path: Path) -> dict:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_dense_row_parallel_group_split(export) -> None:
    """vllm#49949's arithmetic on a dense NVFP4 model: intermediate 1856 / 8 = 232, not a multiple of 16."""
    tiny = dict(heads=16, kv_heads=4, intermediate=1856)
    report = validate(str(export("llama", tiny=tiny)), deployment=Deployment(8))
    hit = next(f for f in report.findings if f.code == "QG711")
    assert hit.predicted_error == "ValueError: Unsupported model when in features size is not multiple of 16"
    assert all(m.endswith("mlp.down_proj") for m in hit.modules)
    assert validate(str(export("llama", tiny=tiny)), deployment=Deployment(4)).ok
    limits = [f for f in validate(str(export("llama", tiny=tiny))).findings if f.code == "QG712"]
    assert len(limits) == 1 and limits[0].details["size"] == 8 and "232" in limits[0].message
