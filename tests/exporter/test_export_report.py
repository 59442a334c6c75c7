"""What an export tells its user (issue 11 §4): the report inside it names the final `--out` path (not
the hidden `.NAME.tmp-XXXXXXXX` sibling it was validated in), in the JSON `target` and the HTML title;
plan warnings print once each (not through logging and again as `warning:`) and read complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quantgate.exporter.excludes import ExcludeSynthesis
from quantgate.exporter.pipeline import FAILED_SUFFIX, REPORT_HTML, REPORT_JSON, QuantizeRequest, run_quantize

REPO = Path(__file__).resolve().parents[2]


def _names_only(out: Path, expected: Path) -> None:
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["target"] == str(expected)
    html = (out / REPORT_HTML).read_text()
    assert f"<title>quantgate: {expected}</title>" in html and ".tmp-" not in html


def test_a_validated_export_names_its_final_path(exported) -> None:
    _, result = exported("llama", "fp8")
    assert result.ok and result.report.target == str(result.output)
    _names_only(result.output, result.output)


def test_a_failed_export_names_where_it_is_kept(exported, tmp_path: Path, monkeypatch) -> None:
    from quantgate.exporter.writers import modelopt

    source, first = exported("qwen3_moe", "nvfp4")
    monkeypatch.setattr(modelopt, "build_excludes", lambda src, plan: ExcludeSynthesis(patterns=[]))
    out = tmp_path / "broken"
    (tmp_path / f"broken{FAILED_SUFFIX}").mkdir()            # an earlier failure: the next one gets ".1"
    req = QuantizeRequest(source=str(source), recipe="nvfp4", out=out, device="cpu",
                          calib_stats=first.output / "calibration.json")
    result = run_quantize(req)
    kept = tmp_path / f"broken{FAILED_SUFFIX}.1"
    assert not result.ok and result.temp_output == kept
    _names_only(kept, kept)


def test_shape_warnings_print_once_and_complete(tiny_model, tmp_path: Path) -> None:
    """The demo Gemma4 under w4a16: in_features 64 is not a multiple of the group 128."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", str(tiny_model("gemma4")),
                           "--recipe", "w4a16", "--out", str(tmp_path / "q"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert not [line for line in lines if line.startswith("WARNING ")], proc.stderr
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings and len(warnings) == len(set(warnings))
    shape = ("model.layers.0.self_attn.q_proj: in_features 64 is not divisible by 128 (W4A16); "
             "left BF16 and excluded")
    assert proc.stderr.count(shape) == 1
    group = [w for w in warnings if w.startswith("warning: model.layers.0.experts: ")]
    assert group == ["warning: model.layers.0.experts: 8 module(s) left BF16 because "
                     "model.layers.0.experts.0.gate_proj is BF16 (in_features 64 is not divisible by 128 "
                     "(W4A16)) and model.layers.0.experts is all-or-nothing"]
