"""An already-quantized source is refused from its config and headers, before any model is loaded
(issue 11 §4): CLI exit 2 with "source is already quantized (...): quantize the original BF16 checkpoint".

Sources: our own ModelOpt NVFP4 / FP8 exports and a compressed-tensors W8A8 export of real tiny models,
a BF16 checkpoint whose config declares a quantization, and one without any config that stores a
weight in FP8. Before the fix these ended in transformers' load errors (exit 1, a traceback) or were
planned as if BF16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate.exporter.pipeline import QuantizeRequest, run_quantize
from quantgate.exporter.quantized_source import AlreadyQuantizedError, quantized_reason
from quantgate.exporter.source import open_source
from quantgate.exporter.testkit.tiny_models import TINY_ARCHS
from quantgate.validators.checkpoint import open_checkpoint

REPO = Path(__file__).resolve().parents[2]
FIX = "quantize the original BF16 checkpoint"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", *args], capture_output=True,
                          check=False, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def w8a8_export(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w8a8") / "q"
    result = run_quantize(QuantizeRequest(source=str(tiny_model("qwen3_moe")), recipe="w8a8_int8", out=out,
                                          dialect="compressed-tensors", device="cpu"))
    assert result.ok
    return out


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded for an already-quantized source")

    monkeypatch.setattr("quantgate.exporter.calibration.model.load_calibration_model", refuse)
    monkeypatch.setattr("quantgate.exporter.calibration.forward.load_calibration_model", refuse)


@pytest.mark.parametrize(("recipe", "label"), [("nvfp4", "ModelOpt NVFP4"), ("fp8", "ModelOpt FP8")])
def test_our_modelopt_exports_are_refused_before_loading(exported, tmp_path, monkeypatch, recipe,
                                                         label) -> None:
    _, result = exported("llama", recipe)
    _no_model_load(monkeypatch)
    with pytest.raises(AlreadyQuantizedError) as info:
        run_quantize(QuantizeRequest(source=str(result.output), recipe="nvfp4", out=tmp_path / "again",
                                     device="cpu"))
    assert str(info.value) == f"source is already quantized ({label}): {FIX}"
    assert not (tmp_path / "again").exists() and not list(tmp_path.iterdir())


def test_cli_exits_2_on_a_modelopt_and_a_compressed_tensors_export(exported, w8a8_export, tmp_path) -> None:
    _, nvfp4 = exported("llama", "nvfp4")
    for source, label in ((nvfp4.output, "ModelOpt NVFP4"), (w8a8_export, "compressed-tensors W8A8")):
        proc = _cli(str(source), "--recipe", "nvfp4", "--out", str(tmp_path / "q"), "--device", "cpu")
        assert proc.returncode == 2, proc.stderr
        expected = f"quantgate quantize: error: source is already quantized ({label}): {FIX}"
        assert proc.stderr.strip() == expected


def test_a_config_declaring_quantization_is_refused(tiny_model, tmp_path) -> None:
    src = tmp_path / "declared"
    shutil.copytree(tiny_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlreadyQuantizedError, match=r"\(quant_method fp8\)"):
        open_source(str(src), refuse_quantized=True)
    assert open_source(str(src)).layout.modules, "opening an export for reading stays allowed"


def test_quantized_tensors_without_a_config_are_refused(tiny_model, tmp_path) -> None:
    src = tmp_path / "fp8-weights"
    shutil.copytree(tiny_model("llama"), src)
    weights = load_file(src / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name].to(torch.float8_e4m3fn)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    reason = rf"quantized tensor\(s\) and no quantization config, e.g\. {name} F8_E4M3"
    with pytest.raises(AlreadyQuantizedError, match=reason):
        open_source(str(src), refuse_quantized=True)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bf16_tiny_models_are_not_quantized(tiny_model, arch: str) -> None:
    view = open_checkpoint(str(tiny_model(arch)))
    assert quantized_reason(view.config, view.hf_quant_config, view.tensors) is None
