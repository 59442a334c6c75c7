"""Run `quantgate serve` as a child process: pick a free loopback port, start it with its output in
a log file, wait until /readyz answers 200, stop it with SIGTERM.

Used by `make demo` (service/demo.py), the service benchmark and the service tests, so every one
of them starts and waits for a real server the same way.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

__all__ = [
    "LOOPBACK",
    "READY_TIMEOUT_S",
    "ServerNotReady",
    "free_port",
    "serve_command",
    "start_server",
    "stop_server",
    "wait_ready",
]

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 60.0
READY_POLL_S = 0.1
STOP_TIMEOUT_S = 60.0


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer /readyz with 200 in time."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(
    data_dir: Path,
    port: int,
    *,
    host: str = LOOPBACK,
    roots: Sequence[Path] = (),
    args: Sequence[str] = (),
) -> list[str]:
    """`python -m quantgate.service.cli serve` on `host:port` with `data_dir`, each of `roots` allowed, then `args`."""
    command = [
        sys.executable,
        "-m",
        "quantgate.service.cli",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    for root in roots:
        command += ["--allowed-root", str(root)]
    return [*command, *args]


def start_server(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str],
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `command` with stdout and stderr appended to `log_path` (`new_session`: in its own
    session and process group, so signals to the caller's group do not reach it)."""
    with open(log_path, "ab") as log:  # the child keeps its own handle on the file
        return subprocess.Popen(
            list(command),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def wait_ready(
    proc: subprocess.Popen[bytes],
    client: httpx.Client,
    *,
    timeout: float = READY_TIMEOUT_S,
    poll_s: float = READY_POLL_S,
) -> None:
    """Poll `GET /readyz` through `client` until it answers 200; ServerNotReady when `proc` exits
    first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerNotReady(f"the server exited with status {proc.returncode}")
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    raise ServerNotReady(f"the server was not ready after {timeout:g}s")


def stop_server(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S
) -> int:
    """Send `sig` (a graceful shutdown) unless it has exited; SIGKILL after `timeout`; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return int(proc.returncode)
