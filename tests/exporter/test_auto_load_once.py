"""The `auto` recipe loads the model once: scoring and calibration share it (issue 11 §3), and scoring
hands it back as it found it (weights equal to the checkpoint's, no gradient kept, eval mode).

Loads are counted at transformers itself (the architecture class's `from_pretrained`), so the count
does not depend on how quantgate routes the call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantgate.exporter.calibration.model import load_calibration_model
from quantgate.exporter.calibration.session import ModelSession, ModelState, check_untouched
from quantgate.exporter.calibration.stats import CalibrationError
from quantgate.exporter.pipeline import QuantizeRequest, run_quantize

transformers = pytest.importorskip("transformers")

AUTO = {"recipe": "auto", "bits": 6.0, "score_samples": 2, "calib_samples": 2, "calib_seq_len": 16,
        "calib_batch_size": 2, "device": "cpu"}


def _count_loads(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[str]:
    calls: list[str] = []
    original = cls.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", counting)
    return calls


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_auto_loads_once_and_calibrates_the_scored_model_untouched(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    import quantgate.exporter.calibration.forward as calibration

    source = tiny_model("qwen3_moe")
    fresh = load_calibration_model(str(source), device="cpu")
    reference = {n: t.clone() for n, t in fresh.state_dict().items()}
    loads = _count_loads(monkeypatch, transformers.Qwen3MoeForCausalLM)
    seen: list[tuple[bool, list[str], list[str]]] = []
    original = calibration.calibrate_model

    def inspect(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        changed = [n for n, t in model.state_dict().items() if not torch.equal(t, reference[n])]
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        seen.append((model.training, changed, grads))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate_model", inspect)
    result = run_quantize(QuantizeRequest(source=str(source), out=tmp_path / "q", method=method, **AUTO))
    assert result.ok and result.auto["method"] == method
    assert loads == [str(source)], f"the model was loaded {len(loads)} times"
    assert seen == [(False, [], [])], "calibration got a model scoring had changed"


def test_a_job_that_needs_no_model_loads_none(exported, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    source, first = exported("llama", "fp8")
    loads = _count_loads(monkeypatch, transformers.LlamaForCausalLM)
    result = run_quantize(QuantizeRequest(source=str(source), recipe="fp8", out=tmp_path / "q", device="cpu",
                                          calib_stats=first.output / "calibration.json"))
    assert result.ok and loads == []


def test_the_session_loads_on_first_use_and_releases(tiny_model: Callable[..., Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    loads = _count_loads(monkeypatch, transformers.LlamaForCausalLM)
    session = ModelSession(str(tiny_model("llama")), device="cpu")
    assert not session.loaded and loads == []
    model = session.model()
    assert session.model() is model and session.loads == 1 and len(loads) == 1
    a = session.batches("random", samples=2, seq_len=8, batch_size=2)
    b = session.batches("random", samples=2, seq_len=8, batch_size=2)
    assert torch.equal(a.batches[0], b.batches[0])
    session.release()
    assert not session.loaded


def test_check_untouched_names_what_scoring_left_behind(tiny_model: Callable[..., Path]) -> None:
    model = load_calibration_model(str(tiny_model("llama")), device="cpu")
    before = ModelState.of(model)
    check_untouched(model, before)
    model.train()
    with pytest.raises(CalibrationError, match="training mode changed to True"):
        check_untouched(model, before)
    model.eval()
    weight = model.get_input_embeddings().weight
    weight.grad = torch.zeros_like(weight)
    with pytest.raises(CalibrationError, match=r"1 parameter\(s\) keep a gradient \(model.embed_tokens"):
        check_untouched(model, before)
    weight.grad = None
    weight.requires_grad_(not weight.requires_grad)
    with pytest.raises(CalibrationError, match="requires_grad changed on 1 parameter"):
        check_untouched(model, before)
