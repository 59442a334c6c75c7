"""Transposed 3-D ("BMM") experts — GPT-OSS and Llama4 — are refused rather than unfused.

ModelOpt keeps these experts 3-D with prefixed scale names and the engines read them in that form;
an unfused per-expert export would not load (and GPT-OSS's interleaved fused biases would no longer
match). Quantizing everything else with the experts excluded must still work and validate clean.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main as cli_main

CALIB = ["--calib-samples", "2", "--calib-seq-len", "16", "--progress", "none", "--device", "cpu"]


@pytest.mark.parametrize("arch", ["gpt_oss", "llama4"])
def test_quantizing_bmm_experts_is_refused_with_a_way_out(tiny_model, tmp_path: Path, arch: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = cli_main(["quantize", str(tiny_model(arch)), "--recipe", "nvfp4", "--out", str(out), *CALIB])
    err = capsys.readouterr().err
    assert rc == 2
    assert "transposed 3-D" in err and "--exclude '*experts*'" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "no temporary output may be left behind"


@pytest.mark.parametrize("arch", ["gpt_oss", "llama4"])
def test_excluding_bmm_experts_exports_the_rest(tiny_model, tmp_path: Path, arch: str) -> None:
    out = tmp_path / "out"
    rc = cli_main(["quantize", str(tiny_model(arch)), "--recipe", "fp8", "--out", str(out),
                   "--exclude", "*experts*", *CALIB])
    assert rc == 0
    from validators.report import validate

    report = validate(str(out))
    assert report.ok
    assert {v["status"] for v in report.to_dict()["verdicts"].values()} == {"loads"}
