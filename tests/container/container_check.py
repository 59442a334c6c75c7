"""HTTP checks of a running quantgate service, for tests/container/container_test.sh (standard library only).

    python3 tests/container/container_check.py make-broken SRC DST        # BF16 copy whose config claims NVFP4
    python3 tests/container/container_check.py job URL TOKEN SOURCE       # a CPU job runs to a validated export
    python3 tests/container/container_check.py broken URL TOKEN PATH      # the validation endpoint flags PATH
    python3 tests/container/container_check.py history URL TOKEN JOB_ID   # the job is still listed, succeeded

Each check prints one line of JSON with what it saw and exits 0 when it held, 1 when it did not.
The same checks run against a local `quantgate serve` (the dry check before a container build).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

JOB_TIMEOUT_S = 900.0
POLL_S = 2.0
CALIBRATION = {"data": "random", "samples": 8, "seq_len": 64, "batch_size": 4}
TERMINAL = {"succeeded", "failed", "cancelled"}
NVFP4_CLAIM = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}


def call(method: str, url: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - http to our own server
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError as exc:  # refused, reset, timed out: the server is not there
        return 0, {"error": str(exc)}


def finish(ok: bool, **seen: Any) -> int:
    print(json.dumps({"ok": ok, **seen}, sort_keys=True))
    return 0 if ok else 1


def make_broken(src: str, dst: str) -> int:
    """The tiny BF16 model with an NVFP4 claim in config.json: every quantizable module is BF16."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    config_path = Path(dst) / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = NVFP4_CLAIM
    config_path.write_text(json.dumps(config, indent=2))
    hf_quant = {"producer": {"name": "modelopt", "version": "0.47.0"},
                "quantization": {k: v for k, v in NVFP4_CLAIM.items() if k != "quant_method"}}
    (Path(dst) / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
    return finish(True, broken=dst)


def check_job(url: str, token: str, source: str) -> int:
    unauthenticated, _ = call("GET", f"{url}/v1/jobs", None)
    status, job = call("POST", f"{url}/v1/jobs", token,
                       {"source": source, "recipe": "nvfp4", "calibration": CALIBRATION, "gpus": 0})
    if status != 201:
        return finish(False, step="submit", status=status, body=job)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while job["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(POLL_S)
        _, job = call("GET", f"{url}/v1/jobs/{job['id']}", token)
    validation = job.get("validation") or {}
    ok = job["status"] == "succeeded" and validation.get("ok") is True and unauthenticated == 401
    return finish(ok, job_id=job["id"], status=job["status"], output_path=job.get("output_path"),
                  validation=validation, error=job.get("error"), seconds=round(
                      (job.get("finished_at") or 0) - (job.get("created_at") or 0), 1),
                  unauthenticated_status=unauthenticated)


def check_broken(url: str, token: str, path: str) -> int:
    status, body = call("POST", f"{url}/v1/validations", token, {"path": path})
    if status != 201:
        return finish(False, status=status, body=body)
    codes = sorted({f["code"] for f in body["report"].get("findings", []) if f.get("severity") == "error"})
    statuses = {engine: verdict.get("status") for engine, verdict in body["verdicts"].items()}
    ok = body["ok"] is False and bool(codes) and all(s != "loads" for s in statuses.values())
    return finish(ok, validation_id=body["id"], verdicts=statuses, error_codes=codes)


def check_history(url: str, token: str, job_id: str) -> int:
    status, listing = call("GET", f"{url}/v1/jobs?limit=100", token)
    jobs = {job["id"]: job for job in (listing or {}).get("data", [])} if status == 200 else {}
    job = jobs.get(job_id)
    ok = job is not None and job["status"] == "succeeded" and (job.get("validation") or {}).get("ok") is True
    return finish(ok, status=status, jobs=len(jobs), job_status=job and job["status"])


def main(argv: list[str]) -> int:
    checks = {"make-broken": make_broken, "job": check_job, "broken": check_broken, "history": check_history}
    if not argv or argv[0] not in checks:
        print(__doc__, file=sys.stderr)
        return 2
    return checks[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
