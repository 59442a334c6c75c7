"""Session-wide test setup: offline Hugging Face libraries, a loopback-only network, shared tiny models.

Every suite gets the same `tiny_model(arch, **overrides) -> Path` factory; each distinct model is
built once per session (exporter.tiny_models, ~0.1 s each once transformers is imported) under a
session temp dir. The directories are shared: copy one before changing it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports huggingface_hub / transformers (they read these at import time).
# Tests that exercise the Hub client against the local fake Hub turn HF_HUB_OFFLINE off themselves.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALLOW_NETWORK_ENV = "QUANTGATE_TEST_ALLOW_NETWORK"


def _is_loopback(address: Any) -> bool:
    """True for AF_UNIX paths and 127.0.0.0/8, ::1, "localhost" (anything else is the network)."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX socket path (or abstract name): local by definition
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # an unresolved host name: refuse rather than let DNS + a connect through


def _guard(method: Callable[..., Any]) -> Callable[..., Any]:
    def connect(self: socket.socket, address: Any, *args: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise ConnectionRefusedError(
                f"tests must not use the network (tried to connect to {address!r}); "
                f"serve what you need on 127.0.0.1 or set {ALLOW_NETWORK_ENV}=1")
        return method(self, address, *args)

    connect.__name__ = method.__name__
    connect.__doc__ = method.__doc__
    return connect


if os.environ.get(ALLOW_NETWORK_ENV) != "1":
    socket.socket.connect = _guard(socket.socket.connect)  # type: ignore[method-assign]
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_model(arch, **overrides)` -> a saved tiny checkpoint dir, built once per session.

    `arch` is one of exporter.tiny_models.TINY_ARCHS; overrides are those of `build_tiny`
    (`hidden=`, `layers=`, `experts=`, `max_shard_size=`, `seed=`, any config key ...).
    """
    from quantgate.exporter.testkit.tiny_models import build_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, **overrides: Any) -> Path:
        key = (arch, repr(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_tiny(arch, root / f"{arch}-{len(cache)}", **overrides)
        return cache[key]

    return get
