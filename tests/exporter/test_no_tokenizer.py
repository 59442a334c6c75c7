"""A model saved by `save_pretrained` without tokenizer files calibrates on random data (issue 11 §1).

transformers 5 builds an *empty* tokenizer (len 1) for such a Qwen3-MoE directory instead of raising;
random calibration used to cap the vocabulary to it and stop with "no usable token ids". Random data
must not depend on a tokenizer at all, and a tokenizer that cannot be the model's is treated as absent,
with one warning.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.exporter.calibration.data import calibration_batches
from quantgate.exporter.calibration.model import load_tokenizer, tokenizer_problem

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SMALL = ("--calib-samples", "4", "--calib-seq-len", "32", "--calib-batch-size", "2", "--device", "cpu")


@pytest.fixture(scope="module")
def bare_qwen3(tiny_model) -> Path:
    path = tiny_model("qwen3_moe", with_tokenizer=False)
    assert not list(path.glob("tokenizer*")) and (path / "config.json").is_file()
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", *args], capture_output=True,
                          check=False, text=True, cwd=REPO, env=env, timeout=300)


def test_transformers_builds_an_empty_tokenizer_we_reject_once(bare_qwen3: Path, caplog) -> None:
    """The precondition of the bug under the installed transformers, and our answer to it."""
    raw = transformers.AutoTokenizer.from_pretrained(bare_qwen3, local_files_only=True)
    assert len(raw) <= 1, "transformers raised or found a real tokenizer: the bug's precondition is gone"
    assert "empty" in tokenizer_problem(raw, 1000)
    with caplog.at_level(logging.WARNING, logger="quantgate.exporter.calibration.model"):
        assert load_tokenizer(str(bare_qwen3), None, None, vocab_size=1000) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "treated as having no tokenizer" in warnings[0].getMessage()


def test_a_real_tokenizer_is_kept_and_a_far_smaller_one_is_not(tiny_model) -> None:
    tok = load_tokenizer(str(tiny_model("llama")), None, None, vocab_size=1000)
    assert tok is not None and tokenizer_problem(tok, 1000) is None   # 489 tokens of a 1000 vocabulary
    assert "far fewer" in tokenizer_problem(tok, 100_000)


def test_random_batches_ignore_the_tokenizer(bare_qwen3: Path) -> None:
    empty = transformers.AutoTokenizer.from_pretrained(bare_qwen3, local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(bare_qwen3, local_files_only=True)
    args = dict(config=config, vocab_size=1000, samples=8, seq_len=32, batch_size=4, seed=3)
    with_empty = calibration_batches("random", tokenizer=empty, **args)
    without = calibration_batches("random", tokenizer=None, **args)
    assert [b.tolist() for b in with_empty.batches] == [b.tolist() for b in without.batches]
    ids = {int(i) for b in without.batches for i in b.flatten()}
    assert max(ids) >= 500 and not ids & {config.pad_token_id, config.eos_token_id, config.bos_token_id}


def test_cli_quantizes_the_tokenizerless_model_with_random_data(bare_qwen3: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    proc = _cli(str(bare_qwen3), "--recipe", "nvfp4", "--calib-data", "random", "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "no usable token ids" not in proc.stderr and "exported and validated" in proc.stderr
    stats = json.loads((out / "calibration.json").read_text())
    assert stats["metadata"]["data"] == "random" and stats["metadata"]["model_class"] == "Qwen3MoeForCausalLM"
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"


def test_cli_text_data_without_a_tokenizer_is_bad_input_with_one_warning(bare_qwen3: Path,
                                                                          tmp_path: Path) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    proc = _cli(str(bare_qwen3), "--recipe", "nvfp4", "--calib-data", str(data), "--out", str(tmp_path / "q"),
                *SMALL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("treated as having no tokenizer") == 1, proc.stderr
    assert "is text, but the model has no tokenizer" in proc.stderr and "Traceback" not in proc.stderr
