"""`quantgate validate`: the CLI contract of issue 2 (exit codes, JSON keys, formats, no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import qc_builders as qb

from quantgate.service.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def healthy(tiny_model, tmp_path_factory) -> Path:
    return qb.build(tiny_model("gemma4"), tmp_path_factory.mktemp("cli") / "healthy")


@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory) -> Path:
    return qb.build(tiny_model("gemma4"), tmp_path_factory.mktemp("cli") / "broken", experts="bf16_fused")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantgate.service.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_exit_codes(healthy: Path, broken: Path, tmp_path: Path, capsys) -> None:
    assert main(["validate", str(healthy)]) == 0
    assert main(["validate", str(broken)]) == 1
    assert main(["validate", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["validate", str(healthy), "--engine", "trt"]) == 2
    assert main(["validate"]) == 2


def test_json_contract(broken: Path, capsys) -> None:
    assert main(["validate", str(broken), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {"quantized", "dialect", "scheme", "findings", "verdicts", "summary", "target", "version"} <= set(doc)
    assert doc["quantized"] is True and doc["dialect"] == "modelopt" and doc["scheme"] == "NVFP4"
    f = next(f for f in doc["findings"] if f["code"] == "QG202")
    assert {"code", "severity", "message", "modules", "engines", "fix"} <= set(f)
    assert f["severity"] == "error" and f["modules"][0].startswith("model.layers.{0,1}.experts.{0..7}.")
    assert doc["verdicts"]["vllm"]["status"] == "fails" and "size of tensor a" in doc["verdicts"]["vllm"]["reason"]
    assert doc["summary"]["by_kind"]["expert"]["bf16_not_excluded"] == 48


def test_single_engine(broken: Path, capsys) -> None:
    assert main(["validate", str(broken), "--format", "json", "--engine", "sglang"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["verdicts"]) == ["sglang"]
    assert all(f["engines"] == ["sglang"] for f in doc["findings"])


def test_formats_and_output_file(broken: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    assert main(["validate", str(broken), "--format", "html", "--output", str(out)]) == 1
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "QG202" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")   # self-contained
    assert main(["validate", str(broken), "--format", "markdown"]) == 1
    md = capsys.readouterr().out
    assert md.startswith("# quantgate validate") and "| vllm | **fails** |" in md
    assert main(["validate", str(tmp_path), "--output", str(tmp_path / "missing" / "x.txt")]) == 2


def test_unquantized_checkpoint_is_info_and_loads(tiny_model, capsys) -> None:
    assert main(["validate", str(tiny_model("llama")), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["quantized"] is False
    assert [f["code"] for f in doc["findings"]] == ["QG100"]
    assert {v["status"] for v in doc["verdicts"].values()} == {"loads"}


def test_no_deep_skips_scale_rules(tiny_model, tmp_path: Path, capsys) -> None:
    out = qb.build(tiny_model("gemma4"), tmp_path / "z", mutate=qb.set_scalar(0.0, "experts.1.down_proj.input_scale"))
    assert main(["validate", str(out), "--format", "json"]) == 1
    assert "QG502" in {f["code"] for f in json.loads(capsys.readouterr().out)["findings"]}
    assert main(["validate", str(out), "--format", "json", "--no-deep"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["deep"] is False and "QG502" not in {f["code"] for f in doc["findings"]}


def test_subprocess_never_imports_torch_and_prints_no_color_when_piped(broken: Path) -> None:
    code = ("import sys, runpy; sys.argv = ['quantgate', 'validate', %r]\n"
            "from quantgate.service.cli import main\nrc = main(sys.argv[1:])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', rc, file=sys.stderr)" % str(broken))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "NOTORCH 1" in proc.stderr, proc.stderr
    assert "\033[" not in proc.stdout and "QG202" in proc.stdout


def test_unreadable_target_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 7)
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
