"""`make bench`: every CPU benchmark in sequence, each in its own subprocess, then one summary.

    python -m benchmarks.run_all [--only validate,export,service,calib] [--json results.json]

Runs, in this order (each is also runnable alone, see its --help):

1. `benchmarks.validate_bench`: header-only validation of a ~180k-tensor DeepSeek-V3-shaped
   checkpoint (built on first use under bench-data/, as file holes: a few MB on disk);
2. `benchmarks.export_bench`: quantize + calibrate + export of a ~36M-parameter Gemma4 MoE on the
   CPU, and the weight pass's peak RSS at two model sizes;
3. `benchmarks.service_bench`: a real `quantgate serve` under 200 concurrent submissions;
4. `benchmarks.calib_bench --preset cpu`: calibration tokens/s.

Works from a fresh clone after `make setup` (every model and checkpoint is generated offline).
The machine's load average is recorded before and after each benchmark: on a shared box, compare
only numbers taken in one run. Children get OMP_WAIT_POLICY=PASSIVE unless it is set, as the
`quantgate` CLI does (exporter/__init__.py), also for the benchmarks that import torch first.
Exits 1 when a benchmark fails: it crashed, a correctness check failed, or a ratio measured side by
side in one run went the wrong way. Absolute times against a budget are reported, never a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    args: tuple[str, ...]
    summarize: Callable[[dict[str, Any]], list[str]]
    json_flag: bool = False            # writes its results with --json FILE (else: last stdout line)


@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    load_before: float
    load_after: float
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _validate_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{name}: best {v.get('best_s')} s, median {v.get('median_s')} s"
             for name, v in (r.get("results") or {}).items() if isinstance(v, dict)]
    verdict = "pass" if r.get("pass") else "FAIL (slower than the naive check)"
    budget = "within" if r.get("within_budget") else "over (reported only; see the load average)"
    return [*lines, f"tensors {r.get('tensors')}, judged {r.get('judged')!r}: {verdict}; "
                    f"{r.get('limit_s')} s budget: {budget}"]


def _export_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    job = r.get("cpu_job")
    if job:
        lines.append(f"cpu job ({job['params'] / 1e6:.1f}M params, {job['calibration']}): {job['wall_s']:.1f} s "
                     f"wall, peak RSS {job['peak_rss_mib']:.0f} MiB, stages "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in job["timings"].items()))
    for row in r.get("weight_pass_rss", []):
        lines.append(f"weight pass {row['layers']} layers ({row['source_mib']:.0f} MiB BF16): "
                     f"{row['timings']['weights']:.2f} s, peak RSS {row['peak_rss_mib']:.0f} MiB")
    return lines


def _calib_lines(r: dict[str, Any]) -> list[str]:
    return [f"{k}: {v}" for k, v in r.items() if k.endswith("per_s") or k in ("params", "tokens")]


def _service_lines(r: dict[str, Any]) -> list[str]:
    return [f"{k}: {json.dumps(v)[:160]}" for k, v in r.items()][:10]


BENCHES: tuple[Bench, ...] = (
    Bench("validate", "benchmarks.validate_bench", ("--repeat", "3"), _validate_lines),
    Bench("export", "benchmarks.export_bench", (), _export_lines, json_flag=True),
    Bench("service", "benchmarks.service_bench", (), _service_lines),
    Bench("calib", "benchmarks.calib_bench", ("--preset", "cpu"), _calib_lines),
)


def _last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def run_one(bench: Bench, timeout: float) -> Outcome:
    """Run one benchmark as a subprocess; its output streams to ours and is also parsed."""
    load_before = os.getloadavg()[0]
    args = [sys.executable, "-m", bench.module, *bench.args]
    with tempfile.TemporaryDirectory(prefix="quantgate-bench-") as tmp:
        json_path = Path(tmp) / "result.json"
        if bench.json_flag:
            args += ["--json", str(json_path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                                  env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1",
                                       "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            return Outcome(bench.name, False, time.perf_counter() - start, load_before, os.getloadavg()[0],
                           error=f"timed out after {timeout:.0f} s")
        seconds = time.perf_counter() - start
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        result = json.loads(json_path.read_text()) if bench.json_flag and json_path.exists() \
            else _last_json_line(proc.stdout)
    error = "" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
    return Outcome(bench.name, proc.returncode == 0, seconds, load_before, os.getloadavg()[0], result, error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(b.name for b in BENCHES),
                        help="comma-separated subset of: " + ", ".join(b.name for b in BENCHES))
    parser.add_argument("--json", default=None, help="write every benchmark's results to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark (default 1800)")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(wanted) - {b.name for b in BENCHES})
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}")
    outcomes = []
    for bench in BENCHES:
        if bench.name in wanted:
            print(f"== {bench.name}: python -m {bench.module} {' '.join(bench.args)}", flush=True)
            outcomes.append(run_one(bench, args.timeout))
    print(f"\n== summary (cores: {os.cpu_count() or 0}; load average before -> after each run)")
    for o in outcomes:
        status = "ok" if o.ok else "FAILED"
        print(f"{o.name:<9} {status:<6} {o.seconds:7.1f} s   load {o.load_before:.1f} -> {o.load_after:.1f}")
        for line in (BENCHES_BY_NAME[o.name].summarize(o.result) if o.result else []):
            print(f"    {line}")
        if o.error:
            print(f"    {o.error}")
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=2, default=str))
    return 0 if all(o.ok for o in outcomes) else 1


BENCHES_BY_NAME: dict[str, Bench] = {b.name: b for b in BENCHES}

if __name__ == "__main__":
    sys.exit(main())
