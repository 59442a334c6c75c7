"""`quantgate validate --engine-version / --tensor-parallel-size / --expert-parallel`: the flags, their
report fields (JSON, text, Markdown, HTML) and their usage errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import qc_builders as qb

from quantgate.service.cli import main
from quantgate.validators.engine_facts import NEWEST


@pytest.fixture(scope="module")
def router_unlisted(tiny_model, tmp_path_factory) -> Path:
    """Qwen3-MoE NVFP4 whose BF16 routers are not excluded: vLLM >= 0.11 fails, 0.10.2 and SGLang load."""
    def drop(qc: qb.QCheckpoint) -> None:
        qc.exclude[:] = [p for p in qc.exclude if not p.endswith("mlp.gate")]
    return qb.build(tiny_model("qwen3_moe"), tmp_path_factory.mktemp("flags") / "q", mutate=drop)


def _json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["validate", *args, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def test_engine_version_picks_the_release(router_unlisted: Path, capsys) -> None:
    code, doc = _json(capsys, str(router_unlisted))
    assert code == 1 and doc["verdicts"]["vllm"]["status"] == "fails"
    assert doc["engine_versions"] == NEWEST and doc["verdicts"]["vllm"]["engine_version"] == NEWEST["vllm"]
    code, doc = _json(capsys, str(router_unlisted), "--engine-version", "vllm=0.10.2", "--engine-version",
                      "sglang=0.5.11")
    assert code == 0 and {v["status"] for v in doc["verdicts"].values()} == {"loads"}
    assert doc["engine_versions"] == {"vllm": "0.10.2", "sglang": "0.5.11"}
    assert doc["verdicts"]["sglang"]["engine_version"] == "0.5.11"


def test_text_markdown_html_name_the_release(router_unlisted: Path, capsys, tmp_path: Path) -> None:
    main(["validate", str(router_unlisted), "--engine-version", "vllm=0.10.2"])
    assert "vllm 0.10.2" in capsys.readouterr().out
    main(["validate", str(router_unlisted), "--format", "markdown"])
    assert f"| vllm | **fails** | " in (md := capsys.readouterr().out) and f" | {NEWEST['vllm']} |" in md
    out = tmp_path / "r.html"
    main(["validate", str(router_unlisted), "--format", "html", "-o", str(out)])
    assert f"vllm {NEWEST['vllm']}</b>" in out.read_text()


def test_tensor_parallel_flags(router_unlisted: Path, capsys) -> None:
    code, doc = _json(capsys, str(router_unlisted), "--engine-version", "vllm=0.10.2", "--tensor-parallel-size", "8")
    assert code == 1 and doc["deployment"] == {"tensor_parallel_size": 8, "expert_parallel": False}
    qg711 = [f for f in doc["findings"] if f["code"] == "QG711"]
    assert qg711 and "must be divisible by tensor parallel size (8)" in qg711[0]["predicted_error"]
    code, doc = _json(capsys, str(router_unlisted), "--engine-version", "vllm=0.10.2", "--tp", "2", "--expert-parallel")
    assert code == 0 and doc["deployment"] == {"tensor_parallel_size": 2, "expert_parallel": True}
    main(["validate", str(router_unlisted), "--tp", "4"])
    assert "at tensor-parallel size 4" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--engine-version", "vllm"], "expected ENGINE=VERSION"),
    (["--engine-version", "trt=1.0"], "unknown engine"),
    (["--engine-version", "vllm=newest"], "is not a release number"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be an integer"),
])
def test_usage_errors_exit_2(router_unlisted: Path, capsys, args: list[str], message: str) -> None:
    assert main(["validate", str(router_unlisted), *args]) == 2
    assert message in capsys.readouterr().err


def test_non_integer_tp_is_a_usage_error(router_unlisted: Path, capsys) -> None:
    assert main(["validate", str(router_unlisted), "--tensor-parallel-size", "two"]) == 2
    assert "invalid int value" in capsys.readouterr().err
