"""The dialect option end to end: `quantgate quantize --dialect`, recipe/dialect combinations, the job body."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ct_helpers import CT_SIZES

from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.recipes import RECIPES, check_dialect, default_dialect
from quantgate.service.cli import main
from quantgate.validators.errors import UsageError


def test_recipe_default_dialects() -> None:
    assert {name: default_dialect(name) for name in ("nvfp4", "fp8", "w4a16", "w8a8_int8", "nvfp4a16")} == {
        "nvfp4": "modelopt", "fp8": "modelopt", "w4a16": "compressed-tensors",
        "w8a8_int8": "compressed-tensors", "nvfp4a16": "compressed-tensors"}
    for recipe in RECIPES.values():
        check_dialect(recipe.name, recipe.dialects[0])


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8_int8", "nvfp4a16"])
def test_ct_only_recipe_as_modelopt_exits_2(tiny_model, tmp_path: Path, capsys, recipe: str) -> None:
    out = tmp_path / "o"
    code = main(["quantize", str(tiny_model("llama", **CT_SIZES)), "--recipe", recipe, "--dialect", "modelopt",
                 "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"recipe {recipe} cannot be written in the modelopt dialect" in err and "--dialect compressed-tensors" in err


def test_auto_recipe_as_compressed_tensors_exits_2(tiny_model, tmp_path: Path, capsys) -> None:
    code = main(["quantize", str(tiny_model("llama")), "--recipe", "auto", "--bits", "6", "--dialect",
                 "compressed-tensors", "--out", str(tmp_path / "o"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "MIXED_PRECISION" in err and "--dialect modelopt" in err


def test_unknown_dialect_is_a_usage_error(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown dialect"):
        run_quantize(QuantizeRequest(source=str(tiny_model("llama")), recipe="fp8", out=tmp_path / "o",
                                     dialect="gguf"))


def test_w4a16_defaults_to_compressed_tensors(tiny_model, tmp_path: Path, capsys) -> None:
    """No --dialect: the recipe's own dialect; no calibration (no calibration.json), validated clean."""
    out = tmp_path / "w4a16"
    code = main(["quantize", str(tiny_model("llama", **CT_SIZES)), "--recipe", "w4a16", "--out", str(out),
                 "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert not (out / "calibration.json").exists() and not (out / "hf_quant_config.json").exists()


def test_nvfp4_in_both_dialects_quantizes_the_same_bytes(tiny_model, tmp_path: Path) -> None:
    """The same recipe in either dialect gives identical NVFP4 codes and block scales; the global scales
    are reciprocals (compressed-tensors 2688/amax vs ModelOpt amax/2688)."""
    from quantgate.exporter.numerics import ct_global_scale
    from quantgate.exporter.source import open_source

    source = str(tiny_model("llama", **CT_SIZES))
    calib = {"calib_samples": 4, "calib_seq_len": 32, "calib_batch_size": 2}
    ct = run_quantize(QuantizeRequest(source=source, recipe="nvfp4", out=tmp_path / "ct", device="cpu",
                                      dialect="compressed-tensors", **calib))
    mo = run_quantize(QuantizeRequest(source=source, recipe="nvfp4", out=tmp_path / "mo", device="cpu",
                                      calib_stats=ct.output / "calibration.json", **calib))
    assert ct.ok and mo.ok
    a, b = open_source(str(ct.output)), open_source(str(mo.output))
    module = "model.layers.1.self_attn.k_proj"
    assert a.tensor(f"{module}.weight_packed").equal(b.tensor(f"{module}.weight"))
    assert a.tensor(f"{module}.weight_scale").view(torch.uint8).equal(b.tensor(f"{module}.weight_scale").view(torch.uint8))
    assert a.tensor(f"{module}.weight_global_scale").equal(ct_global_scale(b.tensor(f"{module}.weight_scale_2")))
    assert a.tensor(f"{module}.input_global_scale").equal(ct_global_scale(b.tensor(f"{module}.input_scale")))


def test_job_body_dialect() -> None:
    pydantic = pytest.importorskip("pydantic")
    from quantgate.service.schemas import JobCreate

    assert JobCreate(source="org/m", recipe="w4a16").dialect == "compressed-tensors"
    assert JobCreate(source="org/m", recipe="nvfp4").dialect == "modelopt"
    assert JobCreate(source="org/m", recipe="fp8", dialect="compressed-tensors").dialect == "compressed-tensors"
    with pytest.raises(pydantic.ValidationError, match="cannot be written in the modelopt dialect"):
        JobCreate(source="org/m", recipe="w8a8_int8", dialect="modelopt")
    with pytest.raises(pydantic.ValidationError):
        JobCreate(source="org/m", recipe="nvfp4", dialect="gguf")


def test_a_python_request_without_a_dialect_takes_the_recipes_own() -> None:
    """The default dialect is resolved in one place (recipes.resolve_dialect), so Python callers get it too."""
    from quantgate.exporter.pipeline import QuantizeRequest, check_request

    assert QuantizeRequest(source="x", recipe="w4a16").dialect == "compressed-tensors"
    assert QuantizeRequest(source="x", recipe="fp8_block").dialect == "fp8"
    assert QuantizeRequest(source="x", recipe="auto").dialect == "modelopt"
    assert QuantizeRequest(source="x", recipe="nvfp4", dialect="compressed-tensors").dialect == "compressed-tensors"
    with pytest.raises(UsageError, match="unknown recipe 'bogus'.*auto"):
        check_request(QuantizeRequest(source="x", recipe="bogus"))
