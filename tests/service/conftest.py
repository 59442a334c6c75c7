"""Service test fixtures: real `quantgate serve` processes on 127.0.0.1, real workers, real SQLite.

`start_server(...)` launches the CLI in its own session with a private data dir and returns a
handle with an httpx client; every server started in a test is stopped (SIGTERM, then SIGKILL)
at teardown. The tiny Gemma4 MoE comes from the session-wide `tiny_model` fixture and is copied
once under an allowed root.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from svc_helpers import Launcher


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """`start_server(data_dir, roots=[...], env={...}, args=[...], token=None)` -> a ready server."""
    launcher = Launcher(tmp_path_factory)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Like `start_server`, for servers shared by a whole test module."""
    launcher = Launcher(tmp_path_factory)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    """An allowed root holding the tiny Gemma4 MoE at `<root>/gemma4` (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_model("gemma4"), root / "gemma4")
    return root
