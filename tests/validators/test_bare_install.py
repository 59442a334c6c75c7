"""The bare install (`pip install quantgate`, no extras) is a working validator, and nothing more.

The wheel is built from this checkout and installed with `--no-deps` into a fresh venv, followed by
exactly the bare requirements its metadata declares (no extras). There, the `quantgate` console
script validates a real local checkpoint and a Hub repo (a local stand-in for the Hub), torch,
transformers, fastapi and pydantic are not importable, and `quantize` / `serve` name the extra to
install instead of raising ImportError.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fake_hub import FakeHubServer

REPO = Path(__file__).resolve().parents[2]
#: The import packages the wheel installs at top level (the one place that names them).
TOP_LEVEL_PACKAGES = {"quantgate"}
#: What the bare install must not bring.
HEAVY = ("torch", "transformers", "fastapi", "pydantic", "uvicorn", "safetensors")
NVFP4_CLAIM = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
BARE_REQUIREMENT = re.compile(r"^Requires-Dist: ([^;]+)$")

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel of this checkout and only its bare requirements."""
    work = tmp_path_factory.mktemp("bare")
    source = work / "src"   # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "tests", "benchmarks", "docs", "build", "dist", "*.egg-info", "__pycache__", "*-data"))
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", work / "dist",
                 source, cwd=work)
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("quantgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")} \
        == TOP_LEVEL_PACKAGES
    bare = [m.group(1).strip() for line in metadata.splitlines() if (m := BARE_REQUIREMENT.match(line))]
    assert bare and not [req for req in bare if req.split(">")[0].split("=")[0].strip() in HEAVY], bare
    venv = work / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    for step in ([base_python, "-m", "venv", venv],
                 [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", wheel],
                 [venv / "bin" / "python", "-m", "pip", "install", "--quiet", *bare]):
        done = _run(*step, cwd=work, env=_env())   # no PYTHONPATH: nothing of the checkout is visible
        assert done.returncode == 0, (step, done.stderr)
    return venv


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("HF_")}
    env.update({"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", **extra})
    return env


def _broken_copy(model: Path, target: Path) -> Path:
    """The tiny BF16 model with an NVFP4 claim: every quantizable module is BF16 (QG201 / QG202)."""
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": NVFP4_CLAIM}))
    return target


def test_bare_install_validates_and_has_no_heavy_dependencies(bare_venv: Path, tiny_model, tmp_path: Path) -> None:
    quantgate, python = bare_venv / "bin" / "quantgate", bare_venv / "bin" / "python"
    probe = _run(python, "-c", "import importlib.util as u, json; "
                 f"print(json.dumps({{m: u.find_spec(m) is not None for m in {HEAVY!r}}}))", cwd=tmp_path, env=_env())
    assert json.loads(probe.stdout) == dict.fromkeys(HEAVY, False), probe.stderr

    clean = _run(quantgate, "validate", tiny_model("gemma4"), cwd=tmp_path, env=_env())
    assert clean.returncode == 0 and "Verdict" in clean.stdout, clean.stderr
    broken = _broken_copy(tiny_model("gemma4"), tmp_path / "broken")
    report = _run(quantgate, "validate", broken, "--format", "json", cwd=tmp_path, env=_env())
    assert report.returncode == 1, report.stderr
    verdicts = json.loads(report.stdout)["verdicts"]
    assert {engine: v["status"] for engine, v in verdicts.items()} == {"vllm": "fails", "sglang": "fails"}

    version = _run(quantgate, "--version", cwd=tmp_path, env=_env())
    assert version.returncode == 0 and re.fullmatch(r"quantgate \d+\.\d+\.\d+\S*\n", version.stdout)


def test_bare_install_validates_a_hub_repo(bare_venv: Path, tiny_model, tmp_path: Path) -> None:
    hub_root = tmp_path / "hub"
    _broken_copy(tiny_model("gemma4"), hub_root / "org" / "broken" / "main")
    with FakeHubServer(hub_root) as hub:
        env = _env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_OFFLINE="0")
        report = _run(bare_venv / "bin" / "quantgate", "validate", "org/broken", "--format", "json",
                      cwd=tmp_path, env=env)
    assert report.returncode == 1, report.stderr
    assert json.loads(report.stdout)["verdicts"]["vllm"]["status"] == "fails"


@pytest.mark.parametrize(("command", "extra"), [("quantize", "export"), ("serve", "serve")])
def test_a_command_without_its_extra_names_the_extra(bare_venv: Path, tmp_path: Path, command: str,
                                                     extra: str) -> None:
    args = [command, str(tmp_path / "src"), "--recipe", "nvfp4", "--out", str(tmp_path / "out")] \
        if command == "quantize" else [command, "--port", "0"]
    done = _run(bare_venv / "bin" / "quantgate", *args, cwd=tmp_path, env=_env())
    assert done.returncode == 2 and done.stdout == ""
    assert f"pip install 'quantgate[{extra}]'" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
