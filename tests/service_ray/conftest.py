"""Ray executor test fixtures: one Ray head (2 CPUs, no GPU) per session inside a private network
namespace (see ray_netns.py), and the tiny Gemma4 MoE under an allowed root.

The whole directory skips, with the reason, when ray is not installed (`pip install
'quantgate[ray]'`) or network namespaces cannot be created; the tests that need neither
(ray stays optional, placement arithmetic) always run.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))  # svc_helpers

from ray_netns import Namespace  # noqa: E402

RAY_MISSING = "ray is not installed (pip install 'quantgate[ray]'); the Ray executor tests need it"


@pytest.fixture(scope="session")
def ray_namespace() -> Iterator[Namespace]:
    """A network namespace with only `lo` up and a Ray head in it; removed at the end."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip(RAY_MISSING)
    if shutil.which("ip") is None:
        pytest.skip("the Ray tests need iproute2's `ip` to create a network namespace")
    namespace = Namespace.create()
    try:
        yield namespace
    finally:
        namespace.destroy()


@pytest.fixture(scope="session")
def ray_model_root(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Path:
    """An allowed root holding the tiny Gemma4 MoE at `<root>/gemma4`."""
    root = tmp_path_factory.mktemp("ray-models")
    shutil.copytree(tiny_model("gemma4"), root / "gemma4")
    return root
