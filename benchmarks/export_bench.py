"""Export benchmarks: CPU end-to-end job, weight-pass memory at two model sizes, GPU weight-pass GB/s.

    python -m benchmarks.export_bench                 # CPU parts (about a minute on 2 cores)
    python -m benchmarks.export_bench --gpu           # + the GPU weight pass on a synthetic model
    python -m benchmarks.export_bench --json out.json

Every measurement runs in a fresh child process, which reports its own wall time and peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`), so import costs are included as in `reference/anchors.md`
and one measurement's memory never leaks into the next.

1. `cpu_job`: quantize + calibrate + export (NVFP4, 16 x 128 random tokens, as the ModelOpt
   anchor) of a ~36M-parameter Gemma4 MoE (hidden 512, 4 layers, 8 experts, inter 1024,
   moe_inter 512, vocab 8192).
2. `weight_pass_rss`: the weight pass alone (reusing the stats of 1 through --calib-stats) on the
   same family at 4 and 16 layers, with 16 MB shards: peak RSS stays flat while the model grows 4x.
3. `gpu_weight_pass` (CUDA only): a synthetic Gemma4 MoE of several GB (random BF16 written
   straight to safetensors, page-cached as in the anchor), weight pass on the GPU, reported as GB/s
   of BF16 read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("export_bench")

GEMMA4_36M: dict[str, Any] = {"hidden": 512, "layers": 4, "experts": 8, "intermediate": 1024,
                              "moe_intermediate": 512, "vocab": 8192, "heads": 8, "kv_heads": 4, "head_dim": 64,
                              "global_head_dim": 64}
CALIB = {"calib_samples": 16, "calib_seq_len": 128, "calib_batch_size": 4}
RSS_SHARD = 16_000_000
GPU_MODEL: dict[str, Any] = {"hidden": 2048, "layers": 8, "experts": 48, "intermediate": 4096,
                             "moe_intermediate": 1024, "vocab": 32768, "heads": 16, "kv_heads": 8, "head_dim": 128,
                             "global_head_dim": 128}


# --------------------------------------------------------------------------- child side
def _child(spec: dict) -> dict:
    """Runs inside a fresh interpreter: one quantize job, returns timings and peak RSS."""
    t0 = time.perf_counter()
    from exporter.pipeline import QuantizeRequest, run_quantize

    req = QuantizeRequest(**spec)
    result = run_quantize(req)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ok": result.ok, "seconds_in_process": time.perf_counter() - t0, "timings": result.timings,
            "bytes_read": result.bytes_read, "max_buffered_bytes": result.max_buffered_bytes,
            "peak_rss_mib": peak_kb / 1024}


def _run_child(spec: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.export_bench", "--child", json.dumps(spec, default=str)],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


# --------------------------------------------------------------------------- models
def build_model(out: Path, size: dict) -> tuple[Path, int]:
    from exporter.source import open_source
    from exporter.tiny_models import build_tiny

    if not (out / "config.json").exists():
        build_tiny("gemma4", out, **size)
    params = sum(info.numel for info in open_source(str(out)).view.tensors.values())
    return out, params


def synthetic_model(out: Path, size: dict, shard_bytes: int = 2_000_000_000) -> tuple[Path, int]:
    """A large Gemma4-shaped checkpoint without instantiating it: shapes from a meta-device model,
    random BF16 values written shard by shard (tokenizer and config from build_tiny's machinery)."""
    import torch
    from safetensors.torch import save_file

    from exporter import tiny_models

    if (out / "config.json").exists():
        from exporter.source import open_source
        return out, sum(i.numel for i in open_source(str(out)).view.tensors.values())
    config = tiny_models.tiny_config("gemma4", **size)
    cls = tiny_models._transformers().Gemma4ForCausalLM
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.bfloat16)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if not n.startswith("lm_head")}
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    size_now = 0
    params = 0

    def flush() -> None:
        nonlocal shard, size_now
        if shard:
            files.append(sorted(shard))
            save_file(shard, str(out / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            shard, size_now = {}, 0

    for name, shape in sorted(shapes.items()):
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size_now += t.numel() * 2
        params += t.numel()
        if size_now >= shard_bytes:
            flush()
    flush()
    n = len(files)
    weight_map = {}
    for i, names in enumerate(files, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(out / final)
        weight_map.update({name: final for name in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(out)
    tiny_models.save_tokenizer(out, config.vocab_size)
    return out, params


def fake_stats(source_dir: Path, path: Path) -> Path:
    """Activation stats covering every decoder Linear (values irrelevant to weight-pass speed)."""
    from exporter.calib_stats import ActivationStats
    from exporter.recipes import make_plan
    from exporter.source import open_source

    plan = make_plan(open_source(str(source_dir)).layout, "nvfp4")
    ActivationStats(amax={n: 4.0 for n in plan.quantized()}, metadata={"model": "synthetic"}).save(path)
    return path


# --------------------------------------------------------------------------- benchmarks
def cpu_job(work: Path) -> dict:
    src, params = build_model(work / "gemma4-36m", GEMMA4_36M)
    res = _run_child(dict(source=str(src), recipe="nvfp4", out=str(work / "out-cpu-job"), device="cpu",
                          overwrite=True, **CALIB))
    res.update(params=params, model="gemma4 hidden 512 x 4 layers x 8 experts", calibration="16 x 128 random")
    return res


def weight_pass_rss(work: Path) -> list[dict]:
    rows = []
    for layers in (4, 16):
        src, params = build_model(work / f"gemma4-l{layers}", {**GEMMA4_36M, "layers": layers})
        res = _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / f"out-l{layers}"), "device": "cpu",
                              "overwrite": True, "calib_stats": str(fake_stats(src, work / f"stats-l{layers}.json")),
                              "shard_size": RSS_SHARD})
        res.update(params=params, layers=layers, source_mib=res["bytes_read"] / 2**20)
        rows.append(res)
    return rows


def gpu_weight_pass(work: Path, size: dict) -> dict:
    src, params = synthetic_model(work / "gemma4-synthetic", size)
    stats = fake_stats(src, work / "stats-synthetic.json")
    subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # page cache
    res = _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / "out-gpu"), "device": "cuda",
                          "overwrite": True, "calib_stats": str(stats)})
    res.update(params=params, gb_read=res["bytes_read"] / 1e9,
               gb_per_s=res["bytes_read"] / 1e9 / res["timings"]["weights"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="bench-data/export")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--gpu", action="store_true", help="also run the GPU weight pass (needs CUDA)")
    p.add_argument("--gpu-layers", type=int, default=GPU_MODEL["layers"])
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if not args.skip_cpu:
        results["cpu_job"] = job = cpu_job(work)
        log.info("cpu job: %.1f s wall (in-process %.1f s: %s), peak RSS %.0f MiB, %d params", job["wall_s"],
                 job["seconds_in_process"], {k: round(v, 2) for k, v in job["timings"].items()},
                 job["peak_rss_mib"], job["params"])
        results["weight_pass_rss"] = rows = weight_pass_rss(work)
        for r in rows:
            log.info("weight pass %2d layers (%d params, %.0f MiB BF16): %.2f s, peak RSS %.0f MiB, buffer %.1f MiB",
                     r["layers"], r["params"], r["source_mib"], r["timings"]["weights"], r["peak_rss_mib"],
                     r["max_buffered_bytes"] / 2**20)
    if args.gpu:
        results["gpu_weight_pass"] = g = gpu_weight_pass(work, {**GPU_MODEL, "layers": args.gpu_layers})
        log.info("gpu weight pass: %.2f GB BF16 read in %.2f s = %.2f GB/s, peak RSS %.0f MiB (%d params)",
                 g["gb_read"], g["timings"]["weights"], g["gb_per_s"], g["peak_rss_mib"], g["params"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
