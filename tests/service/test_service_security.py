"""Path confinement, Hub-id recognition, tokens, redaction, settings guards, Accept parsing, outcomes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantgate.service.executors.local import CPU_SLOT, detect_devices, worker_env
from quantgate.service.executors.outcome import interpret
from quantgate.service.executors.process import describe_exit
from quantgate.service.security import PathNotAllowed, classify_source, redact, resolve_under_roots, token_matches
from quantgate.service.settings import Settings, is_loopback


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    (allowed / "models" / "m").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    return Path(os.path.realpath(allowed)), Path(os.path.realpath(outside))


def test_paths_inside_roots_resolve(roots: tuple[Path, Path]) -> None:
    allowed, _ = roots
    assert resolve_under_roots(str(allowed / "models" / "m"), [allowed]) == allowed / "models" / "m"
    assert (
        resolve_under_roots(str(allowed / "models" / "new-output"), [allowed])
        == allowed / "models" / "new-output"
    )
    assert (
        resolve_under_roots("models/m", [allowed]) == allowed / "models" / "m"
    )  # relative to the first root


@pytest.mark.parametrize(
    "given",
    [
        "{allowed}/../outside",  # traversal
        "{allowed}/models/../../outside/x",  # traversal deeper
        "../outside",  # relative traversal
        "{allowed}/escape",  # symlink out of the root
        "{allowed}/escape/new-dir",  # a new path under a symlink out of the root
        "/etc/passwd",  # absolute elsewhere
        "{allowed}-sibling/x",  # prefix match is not containment
        "file:///etc",
    ],
)
def test_paths_escaping_roots_are_refused(roots: tuple[Path, Path], given: str) -> None:
    allowed, _ = roots
    with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
        resolve_under_roots(given.format(allowed=allowed), [allowed])


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("google/gemma-4-26b-a4b-it", "hub"),
        ("hf://org/name", "hub"),
        ("/models/x", "local"),
        ("./x", "local"),
        ("../x", "local"),
        ("~/x", "local"),
        ("org/..", "local"),
        ("a/b/c", "local"),
        ("org/na..me", "local"),
    ],
)
def test_sources_are_classified(value: str, kind: str) -> None:
    assert classify_source(value) == kind


def test_token_compare_and_redaction() -> None:
    assert token_matches("a" * 20, ["b" * 20, "a" * 20])
    assert not token_matches("a" * 19, ["a" * 20])
    assert (
        redact("token=hf_secret123 and hf_secret123", ["hf_secret123"]) == "token=[REDACTED] and [REDACTED]"
    )


def test_settings_refuse_open_bind_without_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="refusing to listen on '0.0.0.0' without API tokens"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", api_tokens="x" * 32).api_tokens[0].get_secret_value() == "x" * 32
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_tokens="short")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUANTGATE_ALLOWED_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    monkeypatch.setenv("QUANTGATE_GPU_SLOTS", "0,1")
    monkeypatch.setenv("QUANTGATE_MAX_CONCURRENCY", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_for_settings")
    settings = Settings(data_dir=tmp_path / "d")
    assert settings.allowed_roots == [tmp_path / "a", tmp_path / "b"]
    assert settings.gpu_slots == ["0", "1"] and settings.max_concurrency == 0
    assert settings.hf_token.get_secret_value() == "hf_fake_for_settings"
    assert "hf_fake_for_settings" not in repr(settings) and "hf_fake" not in settings.model_dump_json()
    assert settings.roots[0] == settings.data_path


def test_slots_never_initialize_cuda() -> None:
    assert detect_devices(["0", "1"], {}) == ("0", "1")
    assert detect_devices(None, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ("2", "3")
    assert detect_devices(None, {"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ("1",)
    assert detect_devices(None, {"CUDA_VISIBLE_DEVICES": ""}) == (CPU_SLOT,)
    env = worker_env(
        {"QUANTGATE_API_TOKENS": "t" * 20, "PATH": "/bin", "HF_TOKEN": "old"}, device="3", hf_token="hf_new"
    )
    assert (
        env["CUDA_VISIBLE_DEVICES"] == "3"
        and env["HF_TOKEN"] == "hf_new"
        and "QUANTGATE_API_TOKENS" not in env
    )
    assert worker_env({}, device=CPU_SLOT, hf_token=None)["CUDA_VISIBLE_DEVICES"] == ""


def test_worker_outcomes() -> None:
    assert describe_exit(-signal.SIGKILL) == "worker killed by SIGKILL (out of memory?)"
    killed = interpret(-9, None, None, ["loading", "Killed"])
    assert killed.status == "failed" and killed.error_code == "worker_killed"
    assert killed.error_message.startswith("worker killed by SIGKILL (out of memory?)")
    ok = interpret(0, {"ok": True, "output": "/o", "report": {"x": 1}, "validation": {"ok": True}}, None, [])
    assert ok.status == "succeeded" and ok.output == "/o"
    silent = interpret(0, None, None, ["Traceback ...", "ValueError: boom"])
    assert silent.status == "failed" and "ValueError: boom" in silent.error_message
    bad = interpret(2, None, {"code": "bad_input", "message": "no such file"}, [])
    assert (bad.error_code, bad.error_message) == ("bad_input", "no such file")
    failed = interpret(
        1,
        {"ok": False, "failed_output": "/o.failed-validation", "report": {}, "validation": {"errors": 3}},
        None,
        [],
    )
    assert failed.error_code == "validation_failed" and failed.failed_output == "/o.failed-validation"
    uncaught = interpret(1, None, None, ["Traceback (most recent call last):", "KeyError: 'x'"])
    assert uncaught.error_code == "worker_crashed" and "KeyError: 'x'" in uncaught.error_message
    crash = interpret(139, None, None, [])
    assert crash.error_code == "worker_crashed" and "status 139" in crash.error_message
