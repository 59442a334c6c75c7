"""The CLI as a new user meets it: help for every option, the documented exit codes, `--version`,
the README's transcripts, a closed stdout under `--progress json`, and the container's health probe."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.service.cli import build_parser, main
from quantgate.service.healthcheck import probe_url, serve_argv

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "quantgate.service.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300, check=False, **kwargs)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)


def test_help_names_every_format_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = " ".join(capsys.readouterr().out.split())
    for word in ("NVFP4", "FP8", "W4A16", "W8A8-int8", "NVFP4A16", "ModelOpt", "compressed-tensors"):
        assert word in top, word
    assert main(["serve", "--help"]) == 0
    serve = " ".join(capsys.readouterr().out.split())
    assert "3 the server could not start listening (the port is in use" in serve


def test_a_port_in_use_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _cli("serve", "--port", str(taken.getsockname()[1]), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 3 and "address already in use" in done.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"quantgate {version('quantgate')}\n"


def test_the_cli_lists_every_recipe() -> None:
    from quantgate.exporter.recipes import recipe_names
    import argparse

    from quantgate.service.commands.quantize import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    help_text = " ".join(sub.choices["quantize"].format_help().split())
    assert "auto" in recipe_names() and all(name in help_text for name in recipe_names())


def test_the_readme_unknown_recipe_transcript_is_real(tiny_model, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^\$ quantgate quantize (\S+) --recipe nvfp5 --out (\S+)\n(.+)\n\$ echo \$\?\n(\d)$",
                        readme, re.M)
    assert command, "README lost its unknown-recipe transcript"
    done = _cli("quantize", str(tiny_model("gemma4")), "--recipe", "nvfp5", "--out", str(tmp_path / "q2"))
    assert done.stderr.strip() == command.group(3) and str(done.returncode) == command.group(4)


def test_json_progress_into_a_closed_pipe_is_no_traceback(tiny_model, tmp_path: Path) -> None:
    """`quantgate quantize ... --progress json | head -3`: the export goes on, quietly."""
    out = tmp_path / "q"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantgate.service.cli", "quantize", str(tiny_model("llama")), "--recipe", "fp8", "--out",
         str(out), "--device", "cpu", "--calib-samples", "4", "--calib-seq-len", "32", "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    head = [json.loads(proc.stdout.readline()) for _ in range(3)]
    proc.stdout.close()  # what `head -3` does after its third line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, stderr
    assert [event["event"] for event in head] == ["progress"] * 3
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "exported and validated" in stderr and (out / "hf_quant_config.json").is_file()


@pytest.mark.parametrize(
    ("argv", "env", "url"),
    [
        (["--host", "0.0.0.0", "--port", "9000"], {"QUANTGATE_PORT": "8000"}, "http://127.0.0.1:9000/healthz"),
        (["--host", "0.0.0.0"], {"QUANTGATE_PORT": "8123"}, "http://127.0.0.1:8123/healthz"),
        ([], {}, "http://127.0.0.1:8000/healthz"),
        (["--port=9001"], {"QUANTGATE_HOST": "::"}, "http://[::1]:9001/healthz"),
        (["--host", "10.1.2.3", "--port", "80", "--gpu-slots", "cpu"], {}, "http://10.1.2.3:80/healthz"),
    ],
)
def test_the_health_probe_follows_the_servers_command_line(argv: list[str], env: dict, url: str) -> None:
    cmdline = b"\0".join(part.encode() for part in ["/opt/venv/bin/python", "/opt/venv/bin/quantgate", "serve",
                                                     *argv]) + b"\0"
    assert probe_url(serve_argv(cmdline), env) == url


def test_the_health_probe_against_a_real_server(start_server, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    probe = [sys.executable, "-m", "quantgate.service.healthcheck", "--pid", str(server.proc.pid)]
    env = {**os.environ, "QUANTGATE_PORT": "1"}  # the flag on the server's command line wins
    assert subprocess.run(probe, cwd=REPO, env=env, capture_output=True, timeout=60).returncode == 0
    server.stop()
    gone = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "quantgate-healthcheck:" in gone.stderr
