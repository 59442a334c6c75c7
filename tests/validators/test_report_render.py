"""Brace folding, verdicts and the four renderers."""

from __future__ import annotations

import io
import json
import random

import pytest
import qc_builders as qb

from quantgate.validators.findings import Finding, Severity, VerdictStatus
from quantgate.validators.grouping import expand, fold_names, format_ints
from quantgate.validators.render import render_html, render_json, render_markdown, render_text, use_color
from quantgate.validators.report import validate, verdicts


def test_twelve_thousand_experts_fold_to_one_line() -> None:
    names = [f"model.layers.{layer}.mlp.experts.{e}.down_proj" for layer in range(3, 61) for e in range(256)]
    random.Random(0).shuffle(names)
    assert fold_names(names) == ["model.layers.{3..60}.mlp.experts.{0..255}.down_proj"]


@pytest.mark.parametrize("values,text", [([5], "5"), ([1, 2], "{1,2}"), ([0, 1, 2, 3, 5, 7, 8, 9], "{0..3,5,7..9}")])
def test_format_ints(values: list[int], text: str) -> None:
    assert format_ints(values) == text


def test_folding_is_exact_and_deterministic() -> None:
    rng = random.Random(7)
    names = {f"model.layers.{rng.randrange(8)}.mlp.experts.{rng.randrange(40)}.{rng.choice(['up_proj', 'down_proj'])}"
             for _ in range(300)} | {"lm_head", "model.layers.01.x", "model.layers.2.self_attn.q_proj"}
    lines = fold_names(names)
    assert fold_names(sorted(names, reverse=True)) == lines
    assert sorted(n for line in lines for n in expand(line)) == sorted(names)


def test_verdicts_take_the_worst_effect_per_engine() -> None:
    fails = Finding("QG202", Severity.ERROR, "m", engines=("vllm",), effect=VerdictStatus.FAILS,
                    predicted_error="RuntimeError: boom")
    wrong = Finding("QG502", Severity.ERROR, "z", engines=("vllm", "sglang"), effect=VerdictStatus.LOADS_WRONG)
    v = verdicts([wrong, fails], ("vllm", "sglang"), True)
    assert v["vllm"]["status"] == "fails" and v["vllm"]["reason"] == "QG202: RuntimeError: boom"
    assert v["sglang"]["status"] == "loads_wrong"
    assert verdicts([], ("vllm",), False)["vllm"]["status"] == "loads"


@pytest.fixture(scope="module")
def broken_report(tiny_model, tmp_path_factory):
    out = qb.build(tiny_model("gemma4"), tmp_path_factory.mktemp("render") / "b", experts="bf16_fused",
                   mutate=qb.set_scalar(0.0, "layers.0.self_attn.q_proj.input_scale"))
    return validate(str(out))


def test_text_colour_only_when_asked(broken_report, monkeypatch) -> None:
    plain = render_text(broken_report, color=False)
    assert "\033[" not in plain and "QG202 experts-left-bf16" in plain and "model.layers.{0,1}.experts.{0..7}" in plain
    assert "\033[31m" in render_text(broken_report, color=True)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Tty()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Tty())


def test_json_markdown_html(broken_report) -> None:
    doc = json.loads(render_json(broken_report))
    assert doc["summary"]["totals"]["bf16_not_excluded"] == 48
    assert {"QG202", "QG502"} <= {f["code"] for f in doc["findings"]}
    md = render_markdown(broken_report)
    assert "| sglang | **fails** |" in md and "### error QG202" in md
    page = render_html(broken_report)
    assert page.count("<svg") == 1 and "<script" not in page and "<link" not in page
    assert "layer 1 expert 7: BF16, not excluded" in page and "#f9a825" in page    # the amber expert strip
    assert "#c62828" in page                       # q_proj with a zero input_scale: an error cell
    assert "BF16, not excluded" in page
