"""Environment switches (exporter.switches): one spelling for every on/off/auto setting, and a typo is
a usage error the CLI reports in one line with exit 2, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.exporter.switches import AUTO, OFF, ON, SettingError, count, switch
from quantgate.validators.errors import UsageError


@pytest.mark.parametrize(("raw", "expected"), [(None, AUTO), ("", AUTO), (" auto ", AUTO), ("1", ON), ("Yes", ON),
                                               ("true", ON), ("on", ON), ("0", OFF), ("no", OFF), ("FALSE", OFF)])
def test_spellings(monkeypatch, raw, expected: str) -> None:
    if raw is None:
        monkeypatch.delenv("QUANTGATE_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("QUANTGATE_TEST_SWITCH", raw)
    assert switch("QUANTGATE_TEST_SWITCH") == expected


def test_unset_takes_the_default_and_a_typo_is_a_usage_error(monkeypatch) -> None:
    monkeypatch.delenv("QUANTGATE_TEST_SWITCH", raising=False)
    assert switch("QUANTGATE_TEST_SWITCH", default=ON) == ON
    monkeypatch.setenv("QUANTGATE_TEST_SWITCH", "maybe")
    with pytest.raises(SettingError, match=r"QUANTGATE_TEST_SWITCH='maybe': expected auto, 1 or 0") as raised:
        switch("QUANTGATE_TEST_SWITCH")
    assert isinstance(raised.value, UsageError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize(("raw", "minimum", "expected"), [(None, 0, None), ("", 1, None), (" 0 ", 0, 0),
                                                         ("8", 1, 8)])
def test_counts(monkeypatch, raw, minimum: int, expected) -> None:
    if raw is None:
        monkeypatch.delenv("QUANTGATE_TEST_COUNT", raising=False)
    else:
        monkeypatch.setenv("QUANTGATE_TEST_COUNT", raw)
    assert count("QUANTGATE_TEST_COUNT", minimum) == expected


@pytest.mark.parametrize(("raw", "minimum"), [("0", 1), ("-1", 0), ("two", 0), ("1.5", 0)])
def test_a_bad_count_is_a_usage_error(monkeypatch, raw: str, minimum: int) -> None:
    monkeypatch.setenv("QUANTGATE_TEST_COUNT", raw)
    with pytest.raises(SettingError, match=rf"QUANTGATE_TEST_COUNT='{raw}': expected a whole number >= {minimum}"):
        count("QUANTGATE_TEST_COUNT", minimum)


@pytest.mark.parametrize("env", [{"QUANTGATE_OVERLAP": "maybe"}, {"QUANTGATE_WRITES": "consumer"},
                                 {"QUANTGATE_FEED_AHEAD": "lots"}])
def test_a_cli_job_with_a_mistyped_setting_exits_2_and_writes_nothing(tiny_model, tmp_path: Path, env) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "quantize", str(tiny_model("qwen3_moe")),
                           "--recipe", "nvfp4", "--device", "cpu", "--calib-samples", "4", "--calib-seq-len", "16",
                           "--out", str(out)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, check=False)
    name = next(iter(env))
    assert done.returncode == 2, done.stderr
    assert f"error: {name}=" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
