"""The three source folders install as one import namespace, `quantgate.*`, and nothing else.

The repository keeps `service/`, `exporter/` and `validators/` at its top level; pyproject.toml maps
them to `quantgate.service`, `quantgate.exporter` and `quantgate.validators`. These checks keep the
source honest about it: every package folder is listed for the wheel, and no module imports the
folders by their bare names (which works from a checkout, where the repository root is on sys.path,
and breaks in an installed wheel).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("service", "exporter", "validators")
SOURCES = (*FOLDERS, "tests", "benchmarks")
BARE_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:service|exporter|validators)(?:\.|\s|$)", re.M)
BARE_MODULE_STRING = re.compile(r"""(?<![\w./-])(?:f|r)?["'](?:service|exporter|validators)\.[a-z_{]""")
# a package named by its bare folder name: resources.files("service"), import_module("validators") ...
BARE_PACKAGE_ARG = re.compile(r"""\b(?:files|import_module|find_spec)\(\s*["'](?:service|exporter|validators)["']""")
# Builds the app and reads every packaged static file through the installed names only (run from a
# directory where the checkout's bare folders are not importable).
INSTALLED_ONLY = """
import importlib.util, sys
assert importlib.util.find_spec("service") is None, "the checkout's folders must not be importable here"
from fastapi.testclient import TestClient
from quantgate.service.app import create_app
from quantgate.service.settings import Settings
with TestClient(create_app(Settings(data_dir=sys.argv[1], max_concurrency=0))) as client:
    for path in ("/", "/docs", "/static/ui/ui.js", "/static/ui/ui.css", "/static/swagger/swagger-ui-bundle.js"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
print("ok")
"""


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_installs_under_quantgate() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"quantgate.{name}": name for name in FOLDERS}
    folders = {"quantgate." + ".".join(init.parent.relative_to(REPO).parts)
               for name in FOLDERS for init in (REPO / name).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders, "pyproject.toml [tool.setuptools] packages is out of date"


def test_console_scripts_use_the_namespace() -> None:
    scripts = _pyproject()["project"]["scripts"]
    assert scripts and all(target.startswith("quantgate.") for target in scripts.values()), scripts


def test_no_module_uses_the_bare_folder_names() -> None:
    offenders = []
    for top in SOURCES:
        for path in (REPO / top).rglob("*.py"):
            if path == Path(__file__).resolve():
                continue        # this file spells the bare names on purpose
            text = path.read_text(encoding="utf-8")
            for pattern in (BARE_IMPORT, BARE_MODULE_STRING, BARE_PACKAGE_ARG):
                for match in pattern.finditer(text):
                    line = text.count("\n", 0, match.start()) + 1
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {match.group(0).strip()}")
    assert not offenders, "import through quantgate.*:\n" + "\n".join(offenders)


def test_the_app_and_its_static_files_load_through_the_installed_names(tmp_path: Path) -> None:
    """Package data is looked up as `quantgate.service`: from a checkout the bare `service` folder is
    importable (the repository root is on sys.path) and hides a lookup by the old name; here it is not."""
    pytest.importorskip("fastapi")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", INSTALLED_ONLY, str(tmp_path / "data")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


LAYERING_PROBE = """
import sys
import quantgate.exporter.auto.options, quantgate.exporter.recipes, quantgate.service.commands.quantize
assert "torch" not in sys.modules, "the CLI's and the API schema's tables pulled in torch"
import quantgate.exporter.pipeline, quantgate.exporter.writers.registry, quantgate.service.worker
import quantgate.exporter.calibration.forward, quantgate.exporter.auto.stage
leaked = sorted(m for m in sys.modules if m.startswith("quantgate.exporter.testkit"))
assert not leaked, f"the job path imports test support: {leaked}"
"""


def test_the_job_path_never_imports_test_support_and_the_tables_never_import_torch() -> None:
    """Issue 13 item 4: test support (`quantgate.exporter.testkit`) stays out of the product's import path,
    and `auto`'s options are importable without torch (the CLI and the API schema read them)."""
    proc = subprocess.run([sys.executable, "-c", LAYERING_PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
