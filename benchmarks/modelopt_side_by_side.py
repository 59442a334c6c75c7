"""ModelOpt 0.47 and `quantgate quantize` side by side on one GPU: every tensor compared, stages timed.

    python3 -m benchmarks.modelopt_side_by_side --work /tmp/sbs --modelopt-path /tmp/mo --json out.json
    python3 -m benchmarks.modelopt_side_by_side ... --small --recipe fp8      # hidden 256, 2 layers, 8 experts

1. Builds a synthetic Gemma4 MoE (default: the issue's 5.33B shape, hidden 2048, 12 layers, 64
   experts top-8, moe_inter 1024, inter 4096, vocab 32000, tied embeddings; random BF16 written
   straight to safetensors by `export_bench.synthetic_model`) and reads it twice (page cache).
2. ModelOpt in a fresh process (only `--modelopt-path` on its PYTHONPATH): load on CUDA, calibrate
   on 64 x 512 random token ids in batches of 8 (`mtq.NVFP4_DEFAULT_CFG` / `FP8_DEFAULT_CFG`),
   `export_hf_checkpoint`. It reports its stage times and every input quantizer's amax.
3. `python -m quantgate.service.cli quantize SRC --recipe R --device cuda` with the same calibration shape, in
   a fresh process, `--progress json` (its events carry the stage times).
4. Compares every quantized module's tensors: `weight`, `weight_scale`, `weight_scale_2` bit for bit
   (these depend only on the weights); `input_scale` bit for bit given ModelOpt's amax (our
   `activation_scale` on CUDA and on the CPU), and how far our own calibration's input_scale is.
5. `--cpu-check`: quantgate again on the CPU, given ModelOpt's amax (`--calib-stats`), and every
   quantized tensor compared, input_scale included.
Process walls are measured from outside (spawn to exit).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ISSUE_MODEL: dict[str, Any] = {"hidden": 2048, "layers": 12, "experts": 64, "top_k_experts": 8,
                               "moe_intermediate": 1024, "intermediate": 4096, "vocab": 32000, "heads": 16,
                               "kv_heads": 8, "head_dim": 128, "global_head_dim": 128}
SMALL_MODEL: dict[str, Any] = {"hidden": 256, "layers": 2, "experts": 8, "top_k_experts": 2,
                               "moe_intermediate": 256, "intermediate": 512, "vocab": 4096, "heads": 4,
                               "kv_heads": 2, "head_dim": 64, "global_head_dim": 64}
CALIB = {"samples": 64, "seq_len": 512, "batch": 8}
MODELOPT_CONFIGS = {"nvfp4": "NVFP4_DEFAULT_CFG", "fp8": "FP8_DEFAULT_CFG"}
SCHEMES = {"nvfp4": "NVFP4", "fp8": "FP8"}
WEIGHT_DERIVED = ("weight", "weight_scale", "weight_scale_2")


# --------------------------------------------------------------------------- ModelOpt child
def _proc_age() -> float:
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - start / os.sysconf("SC_CLK_TCK")


def modelopt_child(src: str, out: str, recipe: str, report: str) -> None:
    """The ModelOpt side, in its own process: stage times and input amax into `report` (JSON)."""
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    t = {"import": _proc_age()}
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cuda").eval()
    torch.cuda.synchronize()
    t["load"] = time.perf_counter() - t0
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (CALIB["samples"], CALIB["seq_len"]), generator=gen)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for b in ids.split(CALIB["batch"]):
                m(input_ids=b.cuda())

    t1 = time.perf_counter()
    mtq.quantize(model, getattr(mtq, MODELOPT_CONFIGS[recipe]), forward_loop)
    torch.cuda.synchronize()
    t["calibrate"] = time.perf_counter() - t1
    amax: dict[str, float] = {}
    uncalibrated = 0
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if attr.endswith("input_quantizer") and getattr(child, "_amax", None) is not None:
                amax[f"{name}.{attr}"] = float(child._amax.float().max())
            if attr.endswith("weight_quantizers"):   # fused experts: one weight quantizer per expert
                uncalibrated += sum(1 for q in child if getattr(q, "_amax", None) is None)
    t2 = time.perf_counter()
    export_hf_checkpoint(model, export_dir=out)
    t["export"] = time.perf_counter() - t2
    t["load_calibrate_export"] = t["load"] + t["calibrate"] + t["export"]
    import modelopt
    Path(report).write_text(json.dumps({"timings": t, "amax": amax, "uncalibrated_expert_weights": uncalibrated,
                                        "versions": {"modelopt": modelopt.__version__, "torch": torch.__version__,
                                                     "transformers": transformers.__version__,
                                                     "gpu": torch.cuda.get_device_name(0)}}))


# --------------------------------------------------------------------------- parent
def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, list[str], int]:
    """Run `cmd`; returns (wall seconds, stdout lines, exit code); stderr goes to `log`. Its `--out` is
    removed first, untimed: an export an earlier step left there would put its removal into the
    timed run (quantgate's `--overwrite` removes the old export after publishing the new one).
    Each stdout line is timed as it arrives; one more line is appended, a timings event with
    `exit_after_result` (from the result event to the process's end: report, teardown)."""
    if "--out" in cmd:
        shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
    t = time.perf_counter()
    lines: list[str] = []
    result_at = None
    with log.open("w") as err, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if '"event": "result"' in line:
                result_at = time.perf_counter()
        rc = proc.wait()
    end = time.perf_counter()
    if result_at is not None:
        lines.append(json.dumps({"event": "bench", "data": {"timings": {"exit_after_result": end - result_at}}}))
    return end - t, lines, rc


def _load_all(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _quantized_modules(tensors: dict[str, Any]) -> set[str]:
    return {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}


def amax_for(module: str, amax: dict[str, float]) -> float:
    """ModelOpt's input amax behind an exported module (fused experts share one per projection)."""
    if f"{module}.input_quantizer" in amax:
        return amax[f"{module}.input_quantizer"]
    m = re.fullmatch(r"(.*)\.\d+\.(gate_proj|up_proj|down_proj)", module)
    if m is None:
        raise KeyError(module)
    return amax[f"{m.group(1)}.{'down_proj' if m.group(2) == 'down_proj' else 'gate_up_proj'}_input_quantizer"]


def _same(a: Any, b: Any) -> bool:
    import torch

    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def compare(mo: dict[str, Any], ours: dict[str, Any], amax: dict[str, float], scheme: str,
            with_input_scale: bool) -> dict[str, Any]:
    """Counts of differing tensors per suffix and kind (expert / dense), plus input-scale checks."""
    import torch

    from quantgate.exporter.numerics.fp8 import activation_scale

    mo_mods, our_mods = _quantized_modules(mo), _quantized_modules(ours)
    res: dict[str, Any] = {"modules": len(mo_mods), "only_modelopt": sorted(mo_mods - our_mods)[:5],
                           "only_quantgate": sorted(our_mods - mo_mods)[:5],
                           "n_only_modelopt": len(mo_mods - our_mods), "n_only_quantgate": len(our_mods - mo_mods)}
    counts: dict[str, list[int]] = {}
    examples: list[str] = []
    rel: list[float] = []
    for module in sorted(mo_mods & our_mods):
        kind = "expert" if ".experts." in module else "dense"
        for suffix in (*WEIGHT_DERIVED, "input_scale"):
            key = f"{module}.{suffix}"
            if key not in mo:
                continue
            if suffix == "input_scale":
                a = torch.tensor(amax_for(module, amax), dtype=torch.float32)
                for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                    mine = activation_scale(a.to(dev), scheme).reshape(()).cpu()
                    c = counts.setdefault(f"input_scale_given_amax_{dev}", [0, 0])
                    c[0] += 1
                    c[1] += not _same(mine, mo[key].reshape(()))
                ours_is = float(ours[key]) if key in ours else float("nan")
                rel.append(abs(ours_is / float(mo[key]) - 1.0))
                if not with_input_scale:
                    continue
            c = counts.setdefault(f"{kind}.{suffix}", [0, 0])
            c[0] += 1
            if key not in ours or not _same(ours[key], mo[key]):
                c[1] += 1
                if len(examples) < 5:
                    examples.append(key)
    res["tensors"] = {k: {"total": v[0], "differing": v[1]} for k, v in sorted(counts.items())}
    res["differing_weight_derived"] = sum(v[1] for k, v in counts.items()
                                          if k.rsplit(".", 1)[-1] in WEIGHT_DERIVED)
    res["differing_all"] = sum(v[1] for k, v in counts.items() if not k.startswith("input_scale_given"))
    res["examples"] = examples
    if rel:
        res["own_calibration_input_scale_rel_diff"] = {"max": max(rel), "median": sorted(rel)[len(rel) // 2]}
    return res


def _events(lines: list[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Stage times from quantgate's --progress json events, and its result event."""
    timings: dict[str, Any] = {}
    result = None
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "result":
            result = ev
        data = ev.get("data") or {}
        if "import_seconds" in data:
            timings["import"] = data["import_seconds"]
        if "timings" in data:
            timings.update(data["timings"])
        if ev.get("stage") == "write" and "gb_per_s" in data:
            timings["weight_gb_per_s"] = data["gb_per_s"]
    return timings, result


def _lce(timings: dict[str, Any]) -> dict[str, Any]:
    """Load + calibrate + export of a quantgate job: its whole run (`total`), and the same without
    transformers' first-use imports, which ModelOpt's process pays in its import phase, before its
    load timer starts (so that figure compares like with like)."""
    timings["load_calibrate_export"] = timings.get("total", float("nan"))
    timings["load_calibrate_export_after_imports"] = (timings["load_calibrate_export"]
                                                      - timings.get("transformers_import_seconds", 0.0))
    return timings


def _ratios(mo: dict[str, Any], qg: dict[str, Any]) -> dict[str, float]:
    return {"process_wall": qg["process_wall"] / mo["process_wall"],
            "load_calibrate_export": qg["load_calibrate_export"] / mo["load_calibrate_export"],
            "load_calibrate_export_after_imports": qg["load_calibrate_export_after_imports"]
            / mo["load_calibrate_export"]}


def _name_architecture(config: Path) -> None:
    """`architectures` in config.json, as save_pretrained of a model writes it (ModelOpt's export
    reads it; the synthetic checkpoint saves a bare config)."""
    raw = json.loads(config.read_text())
    if not raw.get("architectures"):
        raw["architectures"] = ["Gemma4ForCausalLM"]
        config.write_text(json.dumps(raw, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/sbs")
    p.add_argument("--modelopt-path", default="/tmp/mo")
    p.add_argument("--recipe", default="nvfp4", choices=sorted(MODELOPT_CONFIGS))
    p.add_argument("--small", action="store_true", help="hidden 256, 2 layers, 8 experts (the FP8 case)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--cpu-check", action="store_true")
    p.add_argument("--serial-too", action="store_true", help="also run quantgate with QUANTGATE_OVERLAP=0")
    p.add_argument("--variant", action="append", default=[], help="NAME:ENV=VAL[,ENV=VAL]: quantgate again so")
    p.add_argument("--json", default=None)
    p.add_argument("--role", default="parent", choices=("parent", "modelopt"), help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "modelopt":
        modelopt_child(args.src, args.out, args.recipe, args.report)
        return 0

    from benchmarks.export_bench import _page_cache, synthetic_model
    from benchmarks.source_tree import source_pythonpath   # not at the top: the ModelOpt child runs this
    # file as a script with only ModelOpt on its path

    size = dict(SMALL_MODEL if args.small else ISSUE_MODEL)
    if args.layers:
        size["layers"] = args.layers
    work = Path(args.work) / ("small" if args.small else "issue") / args.recipe
    work.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parents[1])
    source_path = source_pythonpath(Path(repo))   # quantgate.* from this checkout, installed or not
    t = time.perf_counter()
    src, params = synthetic_model(Path(args.work) / ("small" if args.small else "issue") / "src", size)
    _name_architecture(src / "config.json")
    build_s = time.perf_counter() - t
    _page_cache(src)
    cat_gbps = _page_cache(src)
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res: dict[str, Any] = {"model": size, "params": params, "build_s": build_s, "cat_gb_per_s": cat_gbps,
                           "recipe": args.recipe, "calibration": CALIB,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    mo_out, mo_report = work / "modelopt", work / "modelopt.json"
    wall, _, rc = _spawn([sys.executable, __file__, "--role", "modelopt", "--recipe", args.recipe, "--src", str(src),
                          "--out", str(mo_out), "--report", str(mo_report)],
                         {**base_env, "PYTHONPATH": args.modelopt_path}, work / "modelopt.log")
    if rc != 0:
        print((work / "modelopt.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"ModelOpt failed ({rc})")
    mo_info = json.loads(mo_report.read_text())
    res["modelopt"] = {"process_wall": wall, **mo_info["timings"], "versions": mo_info["versions"],
                       "uncalibrated_expert_weights": mo_info["uncalibrated_expert_weights"]}

    qg_out = work / "quantgate"
    qg_cmd = [sys.executable, "-m", "quantgate.service.cli", "quantize", str(src), "--recipe", args.recipe, "--device", "cuda",
              "--calib-samples", str(CALIB["samples"]), "--calib-seq-len", str(CALIB["seq_len"]),
              "--calib-batch-size", str(CALIB["batch"]), "--out", str(qg_out), "--overwrite", "--progress", "json"]
    wall, lines, rc = _spawn(qg_cmd, {**base_env, "PYTHONPATH": source_path}, work / "quantgate.log")
    if rc != 0:
        print((work / "quantgate.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"quantgate failed ({rc})")
    timings, _ = _events(lines)
    _lce(timings)
    res["quantgate"] = {"process_wall": wall, **timings}
    mo_t, qg_t = res["modelopt"], res["quantgate"]
    res["ratios"] = _ratios(mo_t, qg_t)
    if args.serial_too:   # the same job with the weight pass after calibration (QUANTGATE_OVERLAP=0)
        wall, lines, rc = _spawn(qg_cmd[:-5] + ["--out", str(work / "quantgate-serial"), "--overwrite", "--progress",
                                               "json"], {**base_env, "PYTHONPATH": source_path,
                                                         "QUANTGATE_OVERLAP": "0"}, work / "quantgate-serial.log")
        if rc != 0:
            raise SystemExit(f"quantgate (serial) failed ({rc})")
        serial = _lce(_events(lines)[0])
        res["quantgate_serial"] = {"process_wall": wall, **serial}
        res["ratios_serial"] = _ratios(mo_t, res["quantgate_serial"])

    for variant in args.variant:   # the same job under other settings, e.g. "late:QUANTGATE_OVERLAP_START=imports"
        name, _, assignments = variant.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        out = work / f"quantgate-{name}"
        wall, lines, rc = _spawn(qg_cmd[:-5] + ["--out", str(out), "--overwrite", "--progress", "json"],
                                 {**base_env, "PYTHONPATH": source_path, **env}, work / f"quantgate-{name}.log")
        if rc != 0:
            raise SystemExit(f"quantgate ({name}) failed ({rc})")
        t = _lce(_events(lines)[0])
        same = all(filecmp.cmp(f, out / f.name, shallow=False) for f in sorted(qg_out.glob("*.safetensors")))
        res.setdefault("variants", {})[name] = {"env": env, "process_wall": wall, **t,
                                                "ratios": _ratios(mo_t, {"process_wall": wall, **t}),
                                                "shards_identical_to_default": same}
    sys.path[:0] = source_path.split(":")   # in-process imports of quantgate.* below
    mo_tensors = _load_all(mo_out)
    scheme = SCHEMES[args.recipe]
    res["compare_cuda"] = compare(mo_tensors, _load_all(qg_out), mo_info["amax"], scheme, with_input_scale=False)
    stats_path = work / "modelopt_amax_stats.json"
    if args.cpu_check:
        from quantgate.exporter.calibration.stats import ActivationStats

        amax = {m: amax_for(m, mo_info["amax"]) for m in _quantized_modules(mo_tensors)
                if f"{m}.input_scale" in mo_tensors}
        ActivationStats(amax=amax, metadata={"model": str(src), "producer": "modelopt"}).save(stats_path)
        cpu_out = work / "quantgate-cpu"
        cmd = [*qg_cmd[:qg_cmd.index("--device")], "--device", "cpu", "--calib-stats", str(stats_path),
               "--out", str(cpu_out), "--overwrite", "--progress", "json"]
        wall, lines, rc = _spawn(cmd, {**base_env, "PYTHONPATH": source_path}, work / "quantgate-cpu.log")
        if rc != 0:
            print((work / "quantgate-cpu.log").read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"quantgate on the CPU failed ({rc})")
        res["quantgate_cpu"] = {"process_wall": wall, **_events(lines)[0]}
        res["compare_cpu_given_amax"] = compare(mo_tensors, _load_all(cpu_out), mo_info["amax"], scheme,
                                                with_input_scale=True)
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
