"""`make demo`: the whole story on one machine, offline, in well under a minute of compute.

1. build a tiny Gemma4-style MoE (fused 3-D experts, like the real one) into ./demo-data;
2. start `quantgate serve` on 127.0.0.1 (free port, data dir ./demo-data) and wait for /readyz;
3. submit an nvfp4 job, stream its progress over SSE, print the validation report;
4. make the copy PTQ tools make by accident (experts left BF16: the source's fused expert tensors
   in place of the quantized per-expert ones, the NVFP4 config claim kept) and validate it through
   POST /v1/validations to show the catch;
5. stop the server with SIGTERM. Exit status 0 when every step went as expected.

This is a script: it prints for a human reader.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from quantgate.service.launch import (
    LOOPBACK,
    ServerNotReady,
    free_port,
    serve_command,
    start_server,
    stop_server,
    wait_ready,
)

DEMO_DIR = Path("demo-data")
CALIBRATION = {"data": "random", "samples": 8, "seq_len": 64, "batch_size": 4}
JOB_TIMEOUT_S = 600.0
BAR_WIDTH = 24
EXPERTS_SHARD = "model-experts-bf16.safetensors"


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n== {title}")


class DemoFailed(Exception):
    """A step did not go as the story expects."""


def build_model(root: Path) -> Path:
    from quantgate.exporter.testkit.tiny_models import build_tiny

    return build_tiny("gemma4", root / "models" / "gemma4-tiny")


def sse_events(client: httpx.Client, job_id: str) -> Iterator[dict[str, Any]]:
    """Job events from the SSE stream until the server closes it (the job is terminal)."""
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=JOB_TIMEOUT_S
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[len("data: ") :])


def show_progress(event: dict[str, Any]) -> None:
    data = event["data"]
    if event["type"] == "progress":
        fraction = data.get("fraction")
        filled = int(round((fraction or 0) * BAR_WIDTH))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        say(
            f"  {data.get('stage', ''):<9} [{bar}] {'' if fraction is None else f'{fraction:4.0%}'}  "
            f"{event['message'][:70]}"
        )
    else:
        say(f"  {event['type']:<9} {event['message']}")


def show_report(report: dict[str, Any]) -> None:
    for engine, verdict in report["verdicts"].items():
        say(f"  {engine:<7} {verdict['status'].upper():<12} {verdict.get('reason', '')}")
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    others = [f for f in report["findings"] if f["severity"] != "error"]
    say(f"  findings: {len(errors)} error(s), {len(others)} other(s)")
    for finding in errors + others:
        engines = ",".join(finding["engines"])
        say(f"  - {finding['code']} {finding['severity']:<7} [{engines}] {finding['message']}")
        if finding["severity"] == "error" and finding.get("fix"):
            say(f"      fix: {finding['fix']}")


def break_experts(source: Path, export: Path, broken: Path) -> int:
    """Copy `export` to `broken`, with the source's BF16 fused experts in place of the quantized
    per-expert tensors and the NVFP4 config kept: a checkpoint that claims NVFP4 experts it lacks
    (what a PTQ tool whose patterns miss Gemma4's `layers.N.experts` naming produces)."""
    from safetensors.torch import load_file, save_file

    from quantgate.validators.checkpoint import open_checkpoint
    from quantgate.validators.layout import Kind, build_layout
    from quantgate.validators.safetensors_header import read_header

    source_view = open_checkpoint(str(source))
    source_experts = build_layout(source_view.tensors, source_view.config).by_kind(Kind.EXPERT)
    fused = sorted({m.fused.tensor for m in source_experts if m.fused is not None})
    export_view = open_checkpoint(str(export))
    export_experts = build_layout(export_view.tensors, export_view.config).by_kind(Kind.EXPERT)
    quantized = {t.name for m in export_experts for t in m.tensors.values()}
    if not fused or not quantized:
        raise DemoFailed("the tiny model has no fused experts to break")
    shutil.copytree(export, broken)
    for shard in export_view.files:  # drop the quantized experts, shard by shard
        kept = {k: v for k, v in load_file(export / shard).items() if k not in quantized}
        save_file(kept, broken / shard, metadata={"format": "pt"})
    experts = {}
    for shard in sorted({source_view.tensors[name].file for name in fused}):
        experts.update({k: v for k, v in load_file(source / shard).items() if k in fused})
    save_file(experts, broken / EXPERTS_SHARD, metadata={"format": "pt"})
    weight_map = {
        name: shard.name
        for shard in sorted(broken.glob("*.safetensors"))
        for name in read_header(shard).tensors
    }
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2),
        encoding="utf-8",
    )
    for stale in ("quantgate-report.json", "quantgate-report.html"):
        (broken / stale).unlink(missing_ok=True)
    return len(fused)


def run_story(client: httpx.Client, data_dir: Path, source: Path) -> bool:
    """Steps 3-4; True when the export is validated and the broken copy is caught."""
    step("3. submit an nvfp4 job and stream its progress (SSE)")
    response = client.post(
        "/v1/jobs",
        json={"source": str(source), "recipe": "nvfp4", "calibration": CALIBRATION},
        headers={"Idempotency-Key": f"demo-{time.time_ns()}"},
    )
    if response.status_code != 201:
        raise DemoFailed(f"POST /v1/jobs answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    say(f"  job {job_id} queued")
    for event in sse_events(client, job_id):
        show_progress(event)
    job = client.get(f"/v1/jobs/{job_id}").json()
    if job["status"] != "succeeded":
        raise DemoFailed(f"the job ended {job['status']}: {job.get('error')}")
    say(
        f"\n  job {job['status']} in {job['finished_at'] - job['started_at']:.1f}s; "
        f"export at {job['output_path']}"
    )
    say("  validation report of the export:")
    show_report(client.get(f"/v1/jobs/{job_id}/report").json())
    exported_ok = all(v["status"] == "loads" for v in job["validation"]["verdicts"].values())

    step("4. the mistake PTQ tools make: experts left BF16 under an NVFP4 config")
    broken = data_dir / "broken-experts-bf16"
    shutil.rmtree(broken, ignore_errors=True)
    count = break_experts(source, Path(job["output_path"]), broken)
    say(
        f"  {broken}: {count} fused BF16 expert tensors in place of the NVFP4 experts, "
        "config still says NVFP4"
    )
    response = client.post("/v1/validations", json={"path": str(broken)})
    if response.status_code != 201:
        raise DemoFailed(f"POST /v1/validations answered {response.status_code}: {response.text}")
    validation = response.json()
    say(f"  POST /v1/validations -> ok={validation['ok']} (stored as {validation['id']})")
    show_report(validation["report"])
    caught = not validation["ok"] and any(v["status"] != "loads" for v in validation["verdicts"].values())
    say("\n  caught: the broken copy would not have been deployed." if caught else "\n  NOT caught!")
    return exported_ok and caught


def main() -> int:
    data_dir = DEMO_DIR.resolve()
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    step("1. build a tiny Gemma4-style MoE checkpoint offline")
    started = time.monotonic()
    source = build_model(data_dir)
    say(f"  {source} ({sum(f.stat().st_size for f in source.iterdir()) / 1e6:.1f} MB, fused 3-D experts)")

    step("2. start `quantgate serve` on loopback")
    port = free_port()
    log_path = data_dir / "server.log"
    server = start_server(serve_command(data_dir, port), log_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ok = False
    try:
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=60) as client:
            try:
                wait_ready(server, client)
            except ServerNotReady as exc:
                raise DemoFailed(f"{exc}; see {log_path}") from None
            say(
                f"  http://{LOOPBACK}:{port} ready (API docs at /docs, jobs at /, "
                f"log in {data_dir / 'server.log'})"
            )
            ok = run_story(client, data_dir, source)
    except (DemoFailed, httpx.HTTPError) as exc:
        say(f"\nDEMO FAILED: {exc}")
    finally:
        step("5. stop the server (SIGTERM)")
        status = stop_server(server)
        say(f"  server exited with status {status}")
        ok = ok and status == 0
    say(f"\n{'demo OK' if ok else 'demo FAILED'} in {time.monotonic() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
