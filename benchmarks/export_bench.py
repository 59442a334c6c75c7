"""Export benchmarks: CPU end-to-end job, weight-pass memory at two model sizes, GPU weight-pass GB/s.

    python -m benchmarks.export_bench                 # CPU parts (about a minute on 2 cores)
    python -m benchmarks.export_bench --large         # + the design target's 0.5B CPU job
    python -m benchmarks.export_bench --gpu --skip-cpu   # GPU weight pass + GPU job, synthetic 5.2B model
    python -m benchmarks.export_bench --json out.json

Every measurement runs in a fresh child process, which reports its own wall time and peak RSS
(`VmHWM` of /proc/self/status, the high-water mark of this process image; `ru_maxrss` would also
count the parent's pages at fork time, since Linux keeps it across exec), so import costs are included as in `reference/anchors.md`
and one measurement's memory never leaks into the next.

1. `cpu_job`: quantize + calibrate + export (NVFP4, 16 x 128 random tokens, as the ModelOpt
   anchor) of a ~36M-parameter Gemma4 MoE (hidden 512, 4 layers, 8 experts, inter 1024,
   moe_inter 512, vocab 8192).
2. `weight_pass_rss`: the weight pass alone (reusing the stats of 1 through --calib-stats) on the
   same family at 4 and 16 layers, with 16 MB shards: peak RSS stays flat while the model grows 4x.
3. `cpu_job_large` (`--large`): the design target's job, a 0.5B Gemma4 MoE (hidden 1024, 8 layers,
   32 experts, 927 MiB BF16), same calibration; ModelOpt 0.47 took 18.2 s and 2.1 GB here.
4. `gpu_weight_pass` (CUDA only): a synthetic Gemma4 MoE of several GB shaped like the ModelOpt H100
   anchor (hidden 2048, 12 layers, 64 experts top-8, moe_inter 1024; random BF16 written straight to
   safetensors, page-cached as in the anchor), weight pass on the GPU, reported as GB/s of BF16 read.
5. `gpu_job` (CUDA only): the whole job on that model, 64 x 512 random calibration tokens as the
   anchor (ModelOpt: 24.2 s, about 2.4k calibration tokens/s, 1.1 GB/s export).
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
GEMMA4_05B: dict[str, Any] = {**GEMMA4_36M, "hidden": 1024, "layers": 8, "experts": 32, "intermediate": 2048,
                              "moe_intermediate": 512, "head_dim": 128, "global_head_dim": 128}
GPU_MODEL: dict[str, Any] = {"hidden": 2048, "layers": 12, "experts": 64, "intermediate": 2048,
                             "moe_intermediate": 1024, "vocab": 32768, "heads": 16, "kv_heads": 8, "head_dim": 128,
                             "global_head_dim": 128, "top_k_experts": 8}
GPU_CALIB = {"calib_samples": 64, "calib_seq_len": 512, "calib_batch_size": 8}


# --------------------------------------------------------------------------- child side
def _child(spec: dict) -> dict:
    """Runs inside a fresh interpreter: one quantize job, returns timings and peak RSS."""
    t0 = time.perf_counter()
    from quantgate.exporter.pipeline import QuantizeRequest, run_quantize

    profile_to = spec.pop("profile", None)
    if not spec.pop("batch", True):   # the per-group weight pass, for comparison with the batched one
        from quantgate.exporter.writers import modelopt_batched

        modelopt_batched.BATCH_DEVICES = frozenset()
    req = QuantizeRequest(**spec)
    if profile_to:   # where the time goes, by function (own time), for tuning
        import cProfile
        import io
        import pstats

        totals = _time_functions(PROFILED)
        profiler = cProfile.Profile()
        result = profiler.runcall(run_quantize, req)
        text = io.StringIO()
        text.write("summed wall seconds per function, all threads (calls):\n")
        for name, (seconds, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
            text.write(f"  {name:<55} {seconds:8.3f} s  ({calls})\n")
        text.write("\nmain thread, by own time:\n")
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        Path(profile_to).write_text(text.getvalue())
    else:
        result = run_quantize(req)
    peak_kb = peak_rss_kib()
    out = {"ok": result.ok, "seconds_in_process": time.perf_counter() - t0, "timings": result.timings,
           "bytes_read": result.bytes_read, "max_buffered_bytes": result.max_buffered_bytes,
           "peak_rss_mib": peak_kb / 1024, "load_average": os.getloadavg()[0]}
    stats_file = result.stats_path if result.stats_path and result.stats_path.exists() else None
    if stats_file is not None and spec.get("calib_stats") is None:
        meta = json.loads(stats_file.read_text()).get("metadata", {})
        out["calibration"] = {k: meta.get(k) for k in ("tokens", "seconds", "tokens_per_s", "load_seconds",
                                                        "all_experts", "device")}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


#: (module, attribute) timed by `--profile` (wall time summed over every thread that calls them).
PROFILED: tuple[tuple[str, str], ...] = (
    ("quantgate.exporter.source", "Source._read"),
    ("quantgate.exporter.writers.modelopt_batched", "read_group"),
    ("quantgate.exporter.writers.modelopt_batched", "quantize_batch"),
    ("quantgate.exporter.writers.modelopt_batched", "quantize_nvfp4"),
    ("quantgate.exporter.writers.modelopt_batched", "matrix_amax"),
    ("quantgate.exporter.writers.modelopt", "quantize_group"),
    ("quantgate.exporter.writers.common", "read_group"),
    ("quantgate.exporter.writers.sharding", "tensor_bytes"),
    ("quantgate.exporter.writers.sharding", "_pwrite_all"),
    ("quantgate.exporter.unit_feed", "UnitFeed.get"),
    ("quantgate.exporter.weight_pass", "copy_other_files"),
    ("quantgate.exporter.pipeline", "_validate"),
    ("quantgate.exporter.calibration.model", "load_calibration_model"),   # called through the module by calibration.session
    ("quantgate.exporter.calibration.session", "load_tokenizer"),
    ("quantgate.exporter.calibration.forward", "calibrate_model"),
    ("quantgate.exporter.calibration.session", "calibration_batches"),
)


def _time_functions(targets: tuple[tuple[str, str], ...]) -> dict[str, list]:
    """Wrap each target so that its wall time and calls are summed (thread-safe enough: GIL)."""
    import functools
    import importlib

    totals: dict[str, list] = {}
    for module_name, attr in targets:
        owner = importlib.import_module(module_name)
        *path, leaf = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, leaf, None)
        if fn is None:
            continue
        key = f"{module_name}.{attr}"
        totals[key] = [0.0, 0]

        def timed(*args, __fn=fn, __key=key, **kwargs):
            t = time.perf_counter()
            try:
                return __fn(*args, **kwargs)
            finally:
                totals[__key][0] += time.perf_counter() - t
                totals[__key][1] += 1

        setattr(owner, leaf, functools.wraps(fn)(timed))
    return totals


def peak_rss_kib() -> int:
    """Peak resident set of this process image in KiB.

    Linux keeps `ru_maxrss` across exec, so a child started from a big parent would report the
    parent's size; VmHWM is reset by exec. Falls back to ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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
    from quantgate.exporter.source import open_source
    from quantgate.exporter.testkit.tiny_models import build_tiny

    if not (out / "config.json").exists():
        build_tiny("gemma4", out, **size)
    params = sum(info.numel for info in open_source(str(out)).view.tensors.values())
    return out, params


def synthetic_model(out: Path, size: dict, shard_bytes: int = 2_000_000_000) -> tuple[Path, int]:
    """A large Gemma4-shaped checkpoint without instantiating it: shapes from a meta-device model,
    random BF16 values written shard by shard (tokenizer and config from build_tiny's machinery)."""
    import torch
    from safetensors.torch import save_file

    from quantgate.exporter.testkit import tiny_models

    if (out / "config.json").exists():
        from quantgate.exporter.source import open_source
        return out, sum(i.numel for i in open_source(str(out)).view.tensors.values())
    config = tiny_models.tiny_config("gemma4", **size)
    cls = tiny_models._transformers().Gemma4ForCausalLM
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.bfloat16)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if not n.startswith("lm_head")}
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"   # random numbers: seconds on a GPU, minutes on a CPU
    gen = torch.Generator(device=device).manual_seed(0)
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
        t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
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
    from quantgate.exporter.calibration.stats import ActivationStats
    from quantgate.exporter.recipes import make_plan
    from quantgate.exporter.source import open_source

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


def cpu_job_large(work: Path) -> dict:
    src, params = build_model(work / "gemma4-0.5b", GEMMA4_05B)
    res = _run_child(dict(source=str(src), recipe="nvfp4", out=str(work / "out-cpu-0.5b"), device="cpu",
                          overwrite=True, **CALIB))
    res.update(params=params, model="gemma4 hidden 1024 x 8 layers x 32 experts", calibration="16 x 128 random")
    return res


def _page_cache(src: Path) -> float:
    """Read every shard once (as the anchor's page-cached source); returns GB/s of that plain read."""
    files = sorted(src.glob("*.safetensors"))
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return sum(f.stat().st_size for f in files) / 1e9 / (time.perf_counter() - t)


def gpu_weight_pass(work: Path, size: dict, profile: str | None = None, unbatched: bool = True) -> dict:
    t = time.perf_counter()
    src, params = synthetic_model(work / "gemma4-synthetic", size)
    build_s = time.perf_counter() - t
    stats = fake_stats(src, work / "stats-synthetic.json")
    _page_cache(src)
    cat_gbps = _page_cache(src)
    res = _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / "out-gpu"), "device": "cuda",
                      "overwrite": True, "calib_stats": str(stats)})
    res["unbatched_gb_per_s"] = float("nan")
    if unbatched:
        plain = _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / "out-gpu-unbatched"),
                            "device": "cuda", "overwrite": True, "calib_stats": str(stats), "batch": False})
        res["unbatched_gb_per_s"] = plain["bytes_read"] / 1e9 / plain["timings"]["weights"]
    if profile:
        _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / "out-gpu-profile"), "device": "cuda",
                    "overwrite": True, "calib_stats": str(stats), "profile": profile})
    res.update(params=params, gb_read=res["bytes_read"] / 1e9, build_s=build_s, cat_gb_per_s=cat_gbps,
               gb_per_s=res["bytes_read"] / 1e9 / res["timings"]["weights"])
    return res


def gpu_job(work: Path, size: dict, profile: str | None = None) -> dict:
    src, params = synthetic_model(work / "gemma4-synthetic", size)
    res = _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / "out-gpu-job"), "device": "cuda",
                      "overwrite": True, **GPU_CALIB})
    if profile:
        _run_child({"source": str(src), "recipe": "nvfp4", "out": str(work / "out-gpu-job-profile"), "device": "cuda",
                    "overwrite": True, "profile": profile, **GPU_CALIB})
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
    p.add_argument("--large", action="store_true", help="also the 0.5B CPU job of the design target")
    p.add_argument("--skip-gpu-job", action="store_true", help="with --gpu: only the weight pass")
    p.add_argument("--profile", default=None, help="with --gpu: also profile one weight pass into this file")
    p.add_argument("--profile-job", default=None, help="with --gpu: also profile one whole GPU job into this file")
    p.add_argument("--no-unbatched", action="store_true", help="with --gpu: skip the per-group comparison pass")
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
    if args.large:
        results["cpu_job_large"] = big = cpu_job_large(work)
        log.info("cpu job 0.5B: %.1f s wall (in-process %.1f s: %s), peak RSS %.0f MiB, %d params", big["wall_s"],
                 big["seconds_in_process"], {k: round(v, 2) for k, v in big["timings"].items()},
                 big["peak_rss_mib"], big["params"])
    if args.gpu:
        size = {**GPU_MODEL, "layers": args.gpu_layers}
        results["gpu_weight_pass"] = g = gpu_weight_pass(work, size, args.profile, not args.no_unbatched)
        log.info("gpu weight pass: %.2f GB BF16 read in %.2f s = %.2f GB/s (per-group, unbatched: %.2f GB/s; plain "
                 "cat of the page-cached source: %.2f GB/s), peak RSS %.0f MiB, %d params; stages %s", g["gb_read"],
                 g["timings"]["weights"], g["gb_per_s"], g["unbatched_gb_per_s"], g["cat_gb_per_s"], g["peak_rss_mib"], g["params"],
                 {k: round(v, 2) for k, v in g["timings"].items()})
        if not args.skip_gpu_job:
            results["gpu_job"] = j = gpu_job(work, size, args.profile_job)
            log.info("gpu job: %.1f s wall (in-process %.1f s: %s), calibration %s, weight pass %.2f GB/s, "
                     "peak RSS %.0f MiB, peak GPU %.1f GiB", j["wall_s"], j["seconds_in_process"],
                     {k: round(v, 2) for k, v in j["timings"].items()}, j.get("calibration"), j["gb_per_s"],
                     j["peak_rss_mib"], j.get("peak_gpu_gib", 0.0))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
