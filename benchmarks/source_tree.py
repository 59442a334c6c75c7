"""Import `quantgate.*` straight from a source checkout, without installing it.

The repository keeps `service/`, `exporter/` and `validators/` at its top level and installs them as
`quantgate.service`, `quantgate.exporter` and `quantgate.validators`. A machine that cannot
`pip install -e .` (the GPU machine's bare image) gets the same import names from a folder holding a
`quantgate/` namespace directory of symbolic links to those three folders.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

PACKAGES = ("service", "exporter", "validators")


def source_pythonpath(repo: Path, where: Path | None = None) -> str:
    """A PYTHONPATH (links folder, then `repo` for `benchmarks`/`tests`) under which `quantgate.*`
    imports from `repo`; the links folder is created under `where` (default: a new temp dir)."""
    root = Path(where) if where is not None else Path(tempfile.mkdtemp(prefix="quantgate-src-"))
    namespace = root / "quantgate"
    namespace.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = namespace / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(repo).resolve() / name, target_is_directory=True)
    return f"{root}:{Path(repo).resolve()}"
