"""Ray stays optional, and the placement arithmetic the Ray executor queues jobs by (no cluster).

These run with or without ray installed: the service with the local executor never imports ray,
and `--executor ray` without ray is a clear start-up error.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantgate.service.executors.ray_cluster import Need, Snapshot, place, snapshot_from_ray

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        check=False,
    )


def test_the_local_executor_never_imports_ray(tmp_path: Path) -> None:
    result = _python(
        f"""
        import sys
        from fastapi.testclient import TestClient
        from quantgate.service.app import create_app
        from quantgate.service.settings import Settings
        settings = Settings(data_dir={str(tmp_path / "data")!r}, gpu_slots=["cpu"])
        assert settings.executor == "local"
        with TestClient(create_app(settings)) as client:
            ready = client.get("/readyz").json()
            assert ready["status"] == "ready" and "cluster" not in ready, ready
            assert "quantgate_cluster" not in client.get("/metrics").text
        loaded = sorted(name for name in sys.modules if name == "ray" or name.startswith("ray."))
        assert not loaded, loaded
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_executor_ray_without_ray_is_a_clear_start_up_error(tmp_path: Path) -> None:
    result = _python(
        f"""
        import sys
        sys.modules["ray"] = None  # as if the extra were not installed
        from quantgate.service.cli import main
        sys.exit(main(["serve", "--executor", "ray", "--data-dir", {str(tmp_path / "data")!r}]))
        """,
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "the Ray executor needs ray: pip install 'quantgate[ray]'" in result.stderr
    assert "Traceback" not in result.stderr


def _node(node_id: str, gpus: float, cpus: float, alive: bool = True) -> dict[str, object]:
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": "10.0.0.1",
        "Resources": {"GPU": gpus, "CPU": cpus} if gpus else {"CPU": cpus},
    }


@pytest.fixture
def two_nodes() -> Snapshot:
    """Two 4-GPU nodes (one dead 8-GPU node does not count); 3 GPUs and 10 CPUs free."""
    nodes = [_node("a", 4, 16), _node("b", 4, 16), _node("dead", 8, 64, alive=False)]
    return snapshot_from_ray(nodes, {"GPU": 3.0, "CPU": 10.0}, "10.0.0.1:6379")


def test_snapshot_counts_alive_nodes_only(two_nodes: Snapshot) -> None:
    info = two_nodes.info()
    assert (info.nodes, info.gpus_total, info.gpus_free, info.cpus_total) == (2, 8.0, 3.0, 32.0)
    assert two_nodes.node_ids() == {"a", "b"}


@pytest.mark.parametrize(
    ("gpus", "fits_ever", "fits_now"),
    [
        (0, True, True),
        (1, True, True),
        (3, True, True),
        (4, True, False),
        (5, False, False),
        (8, False, False),
    ],
)
def test_a_job_needs_its_gpus_on_one_node(
    two_nodes: Snapshot, gpus: int, fits_ever: bool, fits_now: bool
) -> None:
    placement = place(Need(gpus=gpus, cpus=1), two_nodes)
    assert (placement.fits_ever, placement.fits_now) == (fits_ever, fits_now)
    if not fits_ever:
        assert placement.reason == (
            f"unschedulable: the job needs {gpus} GPU(s) on one node, but the largest node of the Ray "
            "cluster has 4 (2 node(s), 8 GPU(s) in total)"
        )
    elif not fits_now:
        assert placement.reason is not None and placement.reason.startswith("waiting for free resources")


def test_our_own_runs_count_before_ray_reports_them(two_nodes: Snapshot) -> None:
    # Ray says 3 GPUs are free, but 2 of them went to our runs that have not started yet
    pending = Need(gpus=2, cpus=2)
    assert place(Need(gpus=1, cpus=1), two_nodes, held=pending, pending=pending).fits_now
    assert not place(Need(gpus=2, cpus=1), two_nodes, held=pending, pending=pending).fits_now
    # whatever Ray reports, our own runs never exceed the cluster's total
    held = Need(gpus=7, cpus=7)
    assert not place(Need(gpus=2, cpus=1), two_nodes, held=held).fits_now


def test_cpu_only_jobs_and_cpu_requests_larger_than_any_node() -> None:
    cpu_cluster = snapshot_from_ray([_node("a", 0, 2)], {"CPU": 2.0}, None)
    assert place(Need(gpus=0, cpus=1), cpu_cluster).fits_now
    assert not place(Need(gpus=0, cpus=1), cpu_cluster, held=Need(0, 2), pending=Need(0, 0)).fits_now
    too_big = place(Need(gpus=0, cpus=4), cpu_cluster)
    assert not too_big.fits_ever and "needs 4 CPU(s) on one node" in (too_big.reason or "")
    assert not place(Need(gpus=1, cpus=1), cpu_cluster).fits_ever
