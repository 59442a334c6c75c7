"""`quantgate quantize`: exit codes 0 / 1 / 2, one-line reasons, JSON progress lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantgate.exporter.excludes import ExcludeSynthesis
from quantgate.service.cli import main

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", *args], capture_output=True, check=False,
                          text=True, cwd=REPO, env=env, timeout=300)


def test_exports_with_json_progress(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = _cli(str(tiny_model("mixtral")), "--recipe", "fp8", "--out", str(out), "--device", "cpu",
                "--calib-samples", "4", "--calib-seq-len", "32", "--progress", "json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert [s for s in dict.fromkeys(e["stage"] for e in progress)] == [
        "plan", "calibrate", "quantize", "write", "validate", "finalize"]
    assert events[-1] == {"event": "result", "ok": True, "output": str(out), "temp_output": None, "errors": 0,
                          "warnings": events[-1]["warnings"], "timings": events[-1]["timings"]}
    assert (out / "hf_quant_config.json").is_file() and (out / "calibration.json").is_file()
    # per-stage seconds: in each stage's last event, all of them in the finalize event and the result
    stages = {"import", "plan", "calibrate", "load_seconds", "forward_seconds", "weights", "validate", "finalize",
              "total"}
    timings = events[-1]["timings"]
    assert stages <= set(timings) and all(timings[k] >= 0 for k in stages)
    assert progress[0]["data"]["import_seconds"] == timings["import"] > 0
    finals = {e["stage"]: e["data"] for e in progress if e["fraction"] == 1.0 and "seconds" in e["data"]}
    assert set(finals) == {"plan", "calibrate", "write", "validate", "finalize"}
    assert finals["write"]["seconds"] == timings["weights"] and finals["write"]["gb_per_s"] > 0
    assert finals["calibrate"]["forward_seconds"] == timings["forward_seconds"]
    assert set(finals["finalize"]["timings"]) == set(timings) - {"import"}
    assert "exported and validated" in proc.stderr


def _reason(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("quantgate quantize: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_missing_source_exits_2(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path / "absent"), "--recipe", "nvfp4", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no such file or directory" in _reason(proc)


def test_pickle_only_source_exits_2(tmp_path: Path) -> None:
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"w": torch.zeros(1)}, src / "pytorch_model.bin")
    proc = _cli(str(src), "--recipe", "nvfp4", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "pickle" in _reason(proc)


def test_unknown_recipe_exits_2(tiny_model, tmp_path: Path) -> None:
    proc = _cli(str(tiny_model("llama")), "--recipe", "int3", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown recipe 'int3'" in _reason(proc)
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_exits_2(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "weird"
    src.mkdir()
    save_file({"encoder.block.0.conv.weight": torch.zeros(4, 4, 3)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"architectures": ["WeirdNet"]}))
    proc = _cli(str(src), "--recipe", "fp8", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unsupported architecture" in _reason(proc)


def test_existing_output_exits_2(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    proc = _cli(str(tiny_model("llama")), "--recipe", "fp8", "--out", str(out))
    assert proc.returncode == 2 and "--overwrite" in _reason(proc)


@pytest.mark.parametrize("where", ["under_a_file", "refusing_filesystem", "no_permission"])
def test_unwritable_output_exits_2_before_loading(tiny_model, tmp_path: Path, monkeypatch, capsys, where: str) -> None:
    """An --out nobody can create: one line saying why and what to do, exit 2, no traceback (before: a
    PermissionError traceback, exit 1)."""
    source = tiny_model("llama")
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        out, reason = tmp_path / "afile" / "sub" / "o", f"{tmp_path / 'afile'} is not a directory"
    elif where == "refusing_filesystem":   # sysfs refuses new entries even to root, whatever the mode bits
        out, reason = Path("/sys/kernel/quantgate-test/o"), "Operation not permitted"
        if not out.parent.parent.is_dir():
            pytest.skip("no sysfs here")
    else:   # mode bits (tests here may run as root, who passes them: the check is os.access)
        monkeypatch.setattr(os, "access", lambda path, mode: False)
        out, reason = tmp_path / "o", f"no permission to create files in {tmp_path}"
    code = main(["quantize", str(source), "--recipe", "fp8", "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert reason in err and "choose a" in err and "--out" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_shard_size_is_a_usage_error(tiny_model, tmp_path: Path) -> None:
    proc = _cli(str(tiny_model("llama")), "--recipe", "fp8", "--out", str(tmp_path / "o"), "--shard-size", "lots")
    assert proc.returncode == 2 and "invalid size" in proc.stderr


def test_validation_failure_exits_1(exported, tmp_path: Path, monkeypatch, capsys) -> None:
    """In-process (to inject the fault): an export the validator rejects exits 1 and is kept aside."""
    from quantgate.exporter.writers import modelopt

    source, first = exported("qwen3_moe", "nvfp4")
    monkeypatch.setattr(modelopt, "build_excludes", lambda src, plan: ExcludeSynthesis(patterns=[]))
    out = tmp_path / "bad"
    code = main(["quantize", str(source), "--recipe", "nvfp4", "--out", str(out), "--device", "cpu",
                 "--calib-stats", str(first.output / "calibration.json"), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert (tmp_path / "bad.failed-validation" / "quantgate-report.json").is_file()
    assert "validation found" in err and "QG2" in err


@pytest.mark.parametrize(("text", "value"), [("5GB", 5_000_000_000), ("500MB", 500_000_000), ("2GiB", 2 << 30),
                                             ("1000", 1000)])
def test_parse_size(text: str, value: int) -> None:
    from quantgate.service.commands.quantize import parse_size

    assert parse_size(text) == value


@pytest.mark.parametrize(("command", "gc_on"), [("quantize", True), ("validate", False)])
def test_short_lived_commands_end_the_process_when_run_returns(monkeypatch, command: str, gc_on: bool) -> None:
    """`quantize` and `validate` leave without the interpreter's teardown (a GPU job's took 1.5-1.8 s);
    quantize keeps the cyclic GC on while it runs, validate does not need it. The CLI subprocess tests
    above check that every line still reaches the pipes."""
    import argparse
    import gc

    from quantgate.service import cli

    seen: dict[str, bool] = {}

    class Command:
        @staticmethod
        def run(args: argparse.Namespace) -> int:
            seen["gc"] = gc.isenabled()
            return 3

    class Exited(Exception):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    try:
        with pytest.raises(Exited) as info:
            cli._run_and_exit(Command, argparse.Namespace(), without_gc=cli.SHORT_LIVED[command])
    finally:
        gc.enable()
    assert info.value.args == (3,) and seen["gc"] is gc_on
