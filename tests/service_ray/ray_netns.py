"""A Ray head and `quantgate serve --executor ray` inside a private network namespace.

On these machines Ray binds the host's interface address even when told 127.0.0.1, so every Ray
test runs Ray and the service inside a namespace with only `lo` up: nothing can leave the machine,
and Ray binds 127.0.0.1. The test process (outside) reaches the service through a Unix-socket
proxy that runs inside the namespace and forwards to the service's loopback port (path-based Unix
sockets are not namespaced); its HTTP calls are real requests to the real server.

Teardown kills exactly the processes inside the namespace (`ip netns pids`), then deletes it.
(`ray stop --force` matches Ray processes by name across the whole host, so it could stop another
session's Ray; the namespace's pid list is precise.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from svc_helpers import FAKE_HF_TOKEN, ServerHandle

from quantgate.service import launch

VENV_BIN = Path(sys.executable).parent
PROXY = Path(__file__).with_name("uds_proxy.py")
RAY_START_TIMEOUT_S = 120.0
RAY_CPUS = 2
GCS_PORT = 6379
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is ~75 MiB; the jobs pass only small dicts


def run_checked(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Namespace:
    """A network namespace with only `lo` up and a Ray head (2 CPUs, no GPU) running in it."""

    name: str
    ray_dir: Path

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{GCS_PORT}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        listing = run_checked(["ip", "netns", "pids", self.name])
        return [int(pid) for pid in listing.stdout.split() if pid.isdigit()]

    @classmethod
    def create(cls) -> Namespace:
        name = f"qg-ray-{secrets.token_hex(4)}"
        added = run_checked(["ip", "netns", "add", name])
        if added.returncode != 0:
            pytest.skip(f"cannot create a network namespace for the Ray tests: {added.stderr.strip()}")
        # a short temp dir: Ray's Unix socket paths must stay under 107 characters
        namespace = cls(name=name, ray_dir=Path(f"/tmp/{name}"))
        try:
            up = run_checked(namespace.exec_argv(["ip", "link", "set", "lo", "up"]))
            assert up.returncode == 0, up.stderr
            namespace.start_ray()
        except BaseException:
            namespace.destroy()
            raise
        return namespace

    def start_ray(self) -> None:
        started = run_checked(
            self.exec_argv(
                [
                    str(VENV_BIN / "ray"),
                    "start",
                    "--head",
                    f"--num-cpus={RAY_CPUS}",
                    "--num-gpus=0",
                    "--node-ip-address=127.0.0.1",
                    f"--port={GCS_PORT}",
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                    f"--object-store-memory={OBJECT_STORE_BYTES}",
                    f"--temp-dir={self.ray_dir}",
                ]
            ),
            timeout=RAY_START_TIMEOUT_S,
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"

    def destroy(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        run_checked(["ip", "netns", "del", self.name])
        shutil.rmtree(self.ray_dir, ignore_errors=True)


@dataclass
class RayServer(ServerHandle):
    """A `quantgate serve --executor ray` process in the namespace, reached through a Unix socket."""

    socket_path: Path | None = None
    proxy: subprocess.Popen[bytes] | None = None

    @property
    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(transport=transport, base_url="http://quantgate", timeout=30.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        code = super().stop(sig, timeout)
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.kill()
            self.proxy.wait(timeout=10)
        return code


def start_ray_server(
    namespace: Namespace,
    data_dir: Path,
    log_dir: Path,
    *,
    roots: Sequence[Path] = (),
    args: Sequence[str] = (),
    port: int = 8000,
) -> RayServer:
    """A ready server on 127.0.0.1:`port` inside `namespace`, joined to its Ray head."""
    log_path = log_dir / f"server-{port}.log"
    socket_path = log_dir / f"http-{port}.sock"
    command = launch.serve_command(
        data_dir,
        port,
        roots=roots,
        args=[
            "--executor",
            "ray",
            "--ray-address",
            namespace.ray_address,
            "--cancel-grace-seconds",
            "3",
            *args,
        ],
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("QUANTGATE_", "RAY_"))}
    env.update({"HF_TOKEN": FAKE_HF_TOKEN, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    proc = launch.start_server(namespace.exec_argv(command), log_path, env=env, new_session=True)
    proxy = launch.start_server(
        namespace.exec_argv([sys.executable, str(PROXY), str(socket_path), str(port)]),
        log_path,
        env=os.environ,
        new_session=True,
    )
    server = RayServer(
        proc=proc,
        base_url="http://quantgate",
        data_dir=data_dir,
        log_path=log_path,
        socket_path=socket_path,
        proxy=proxy,
    )
    try:
        with server.client as client:
            launch.wait_ready(proc, client, poll_s=0.2)
    except launch.ServerNotReady as exc:
        server.stop()
        raise AssertionError(f"{exc}:\n{server.log_text()}") from None
    return server
