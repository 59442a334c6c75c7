"""The three source folders install as one import namespace, `quantgate.*`, and nothing else.

The repository keeps `service/`, `exporter/` and `validators/` at its top level; pyproject.toml maps
them to `quantgate.service`, `quantgate.exporter` and `quantgate.validators`. These checks keep the
source honest about it: every package folder is listed for the wheel, and no module imports the
folders by their bare names (which works from a checkout, where the repository root is on sys.path,
and breaks in an installed wheel).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("service", "exporter", "validators")
SOURCES = (*FOLDERS, "tests", "benchmarks")
BARE_IMPORT = re.compile(r"^\s*(?:from|import)\s+(?:service|exporter|validators)(?:\.|\s|$)", re.M)
BARE_MODULE_STRING = re.compile(r"""(?<![\w./-])(?:f|r)?["'](?:service|exporter|validators)\.[a-z_{]""")


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
            text = path.read_text(encoding="utf-8")
            for pattern in (BARE_IMPORT, BARE_MODULE_STRING):
                for match in pattern.finditer(text):
                    line = text.count("\n", 0, match.start()) + 1
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {match.group(0).strip()}")
    assert not offenders, "import through quantgate.*:\n" + "\n".join(offenders)
