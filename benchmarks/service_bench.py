"""Service load: 200 concurrent `POST /v1/jobs`, idempotent replays, and validation throughput.

A real `quantgate serve` runs in its own process on 127.0.0.1; this process is the client (httpx,
asyncio). The server is started with `--max-concurrency 0`, a real setting meaning "accept and
persist jobs but dispatch none", so the numbers measure the API and the durable store (every
POST commits with synchronous=FULL before it answers), not quantization.

1. 200 concurrent submissions, each with its own Idempotency-Key -> p50/p99/max latency;
2. the same 200 replayed concurrently -> every answer names the job the key created;
   (and, for reference, 200 more submitted with 10 in flight: the server's steady-state rate);
3. 20 reuses of one key with another body -> every answer is 422;
4. the server is stopped (SIGTERM) and started again: all 200 jobs are still listed;
5. `POST /v1/validations` on a tiny NVFP4 export (built once with the exporter): sequential and
   8-way concurrent throughput.

Prints a table and one JSON line; exits 1 when any check fails.

    python -m benchmarks.service_bench [--jobs 200] [--validations 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from quantgate.service import launch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench-data" / "service"
CALIBRATION = {"data": "random", "samples": 4, "seq_len": 32, "batch_size": 2}
VALIDATION_CONCURRENCY = 8
STEADY_CONCURRENCY = 10


def tiny_checkpoints() -> tuple[Path, Path]:
    """(BF16 source, NVFP4 export) of the tiny Gemma4 MoE, built once under bench-data/service."""
    source, export = BENCH_DIR / "models" / "gemma4", BENCH_DIR / "models" / "gemma4-nvfp4"
    if not (source / "config.json").exists():
        from quantgate.exporter.testkit.tiny_models import build_tiny

        shutil.rmtree(source, ignore_errors=True)
        build_tiny("gemma4", source)
    if not (export / "hf_quant_config.json").exists():
        from quantgate.exporter.pipeline import QuantizeRequest, run_quantize

        shutil.rmtree(export, ignore_errors=True)
        result = run_quantize(
            QuantizeRequest(
                source=str(source),
                recipe="nvfp4",
                out=export,
                calib_samples=4,
                calib_seq_len=32,
                calib_batch_size=2,
            )
        )
        if not result.ok:
            raise SystemExit(f"the tiny NVFP4 export failed validation: {result.temp_output}")
    return source, export


class Server:
    """`quantgate serve --max-concurrency 0` on a free loopback port."""

    def __init__(self, data_dir: Path, root: Path) -> None:
        self.data_dir, self.root = data_dir, root
        self.port = launch.free_port()
        self.url = f"http://{launch.LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_path = self.data_dir.parent / "server.log"
        command = launch.serve_command(
            self.data_dir,
            self.port,
            roots=[self.root],
            args=["--max-concurrency", "0", "--log-level", "warning"],
        )
        self.proc = launch.start_server(command, log_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            with httpx.Client(base_url=self.url) as client:
                launch.wait_ready(self.proc, client)
        except launch.ServerNotReady as exc:
            raise SystemExit(f"{exc}; see {log_path}") from None

    def stop(self) -> int:
        assert self.proc is not None
        return launch.stop_server(self.proc)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed_posts(
    url: str, path: str, bodies: list[dict], headers: list[dict[str, str]], concurrency: int
) -> tuple[list[httpx.Response], list[float], float]:
    """POST every body with at most `concurrency` in flight; (responses, latencies s, wall s)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(body: dict, header: dict[str, str]) -> tuple[httpx.Response, float]:
            async with gate:
                start = time.perf_counter()
                response = await client.post(path, json=body, headers=header)
                return response, time.perf_counter() - start

        wall = time.perf_counter()
        results = await asyncio.gather(*(one(b, h) for b, h in zip(bodies, headers, strict=True)))
        wall = time.perf_counter() - wall
    return [r for r, _ in results], [t for _, t in results], wall


def measure(
    name: str, url: str, path: str, bodies: list[dict], headers: list[dict[str, str]], concurrency: int
) -> tuple[list[httpx.Response], dict[str, Any]]:
    """Run one phase; its responses and a result row (latency percentiles, throughput, client CPU)."""
    cpu = client_cpu_s()
    responses, latencies, wall = asyncio.run(timed_posts(url, path, bodies, headers, concurrency))
    return responses, {
        "phase": name,
        "requests": len(latencies),
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "max_ms": 1e3 * max(latencies),
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
        "client_cpu_s": client_cpu_s() - cpu,
    }


def list_all_jobs(url: str) -> list[str]:
    ids, after = [], None
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            page = client.get("/v1/jobs", params={"limit": 100, **({"after": after} if after else {})}).json()
            ids += [job["id"] for job in page["data"]]
            if not page["has_more"]:
                return ids
            after = page["last_id"]


def run(jobs: int, validations: int) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    source, export = tiny_checkpoints()
    with tempfile.TemporaryDirectory(prefix="service-bench-", dir=BENCH_DIR) as tmp:
        server = Server(Path(tmp) / "data", BENCH_DIR / "models")
        server.start()
        body = {"source": str(source), "recipe": "nvfp4", "calibration": CALIBRATION}
        keys = [{"Idempotency-Key": f"bench-{i}"} for i in range(jobs)]
        rows = []
        created, row = measure(
            f"POST /v1/jobs x{jobs}, all concurrent (new keys)",
            server.url,
            "/v1/jobs",
            [body] * jobs,
            keys,
            jobs,
        )
        rows.append(row)
        replayed, row = measure(
            f"POST /v1/jobs x{jobs}, all concurrent (replays)",
            server.url,
            "/v1/jobs",
            [body] * jobs,
            keys,
            jobs,
        )
        rows.append(row)
        steady_keys = [{"Idempotency-Key": f"steady-{i}"} for i in range(jobs)]
        steady, row = measure(
            f"POST /v1/jobs x{jobs}, {STEADY_CONCURRENCY} in flight (new keys)",
            server.url,
            "/v1/jobs",
            [body] * jobs,
            steady_keys,
            STEADY_CONCURRENCY,
        )
        rows.append(row)
        conflicts, _ = measure(
            "conflicts", server.url, "/v1/jobs", [{**body, "recipe": "fp8"}] * 20, keys[:20], 20
        )
        created_ids = [r.json().get("id") for r in created]
        checks = {
            "all_created_201": all(r.status_code == 201 for r in created + steady),
            "distinct_jobs": len(set(created_ids)) == jobs,
            "replays_same_job": [r.json().get("id") for r in replayed] == created_ids
            and all(r.headers.get("idempotent-replayed") == "true" for r in replayed),
            "other_body_422": all(r.status_code == 422 for r in conflicts),
        }
        stopped = server.stop()
        server.start()  # same data dir: everything acknowledged must still be there
        expected = sorted(created_ids + [r.json()["id"] for r in steady])
        checks["persisted_after_restart"] = stopped == 0 and sorted(list_all_jobs(server.url)) == expected
        target = [{"path": str(export)}] * validations
        _, row = measure(
            f"POST /v1/validations x{validations}, sequential",
            server.url,
            "/v1/validations",
            target,
            [{}] * validations,
            1,
        )
        rows.append(row)
        vals, row = measure(
            f"POST /v1/validations x{validations}, {VALIDATION_CONCURRENCY} in flight",
            server.url,
            "/v1/validations",
            target,
            [{}] * validations,
            VALIDATION_CONCURRENCY,
        )
        rows.append(row)
        checks["validations_ok"] = all(r.status_code == 201 and r.json()["ok"] for r in vals)
        server.stop()
    return rows, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--validations", type=int, default=100)
    args = parser.parse_args(argv)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    rows, checks = run(args.jobs, args.validations)
    lines = [
        "server: quantgate serve --max-concurrency 0 (jobs accepted and persisted, none dispatched); "
        f"client: httpx asyncio in a separate process; {os.cpu_count()} CPU(s)",
        f"{'phase':<50} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>8} {'client cpu s':>12}",
    ]
    lines += [
        f"{r['phase']:<50} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['max_ms']:8.1f} {r['req_per_s']:8.1f} "
        f"{r['client_cpu_s']:12.2f}"
        for r in rows
    ]
    lines += [f"check {name}: {'ok' if passed else 'FAILED'}" for name, passed in checks.items()]
    print("\n".join(lines))  # noqa: T201 - benchmark report
    print(json.dumps({"benchmark": "service", "rows": rows, "checks": checks}))  # noqa: T201
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
