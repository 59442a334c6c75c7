"""`quantgate validate --help` documents every flag issue 10 added (through the real CLI process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def help_text() -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "validate", "--help"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


@pytest.mark.parametrize("flag,words", [
    ("--strict", "unknown"),
    ("--engine-version ENGINE=VERSION", "sglang=0.5.11"),
    ("--tensor-parallel-size N", "tensor-parallel size"),
    ("--expert-parallel", "experts are distributed"),
])
def test_help_documents_the_flag(help_text: str, flag: str, words: str) -> None:
    assert flag in help_text and words in help_text
