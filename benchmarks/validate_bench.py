"""Header-only validation speed on a DeepSeek-V3-shaped NVFP4 checkpoint (~180k tensors, 72 shards).

`--form fp8` benchmarks the same model in DeepSeek-V3's official native fp8 block form instead
(~90k tensors; every `weight_scale_inv` block scale is real data and is screened by the deep
checks) and also times `quantgate validate` on the NVFP4 form in the same run, interleaved: the
fp8 form must validate no slower than the NVFP4 form.

Times, each as a fresh subprocess (interpreter start included), best and median of N runs:

- `quantgate validate DIR --format json` (all rules), when the command exists;
- `open_checkpoint(DIR)` alone: the I/O foundation (headers, index, configs, integrity checks);
- the naive check: open every shard with `safetensors.safe_open(f, "pt")`, list its keys, and
  fnmatch every `.weight` without a `weight_scale` sibling against `exclude_modules` (one rule,
  no engine semantics; what a careful user would script).

Prints a table and one JSON line. Exits 1 only when quantgate is slower than the naive check, the
two measured side by side in this run (when `quantgate validate` is not available yet, the
`open_checkpoint` timing stands in for it). The 1 s budget is reported (`within_budget`) but never
fails the run: on a busy shared machine a wall time says as much about the neighbours as about us.

The checkpoint's shards are laid out as safetensors writes them (scalar scales contiguous);
`--order module` benchmarks the worst case for the deep scale reads instead (every scalar between
two multi-MB weights), in its own directory.

Bytecode: an installed quantgate (and the stdlib, torch ...) runs from compiled `.pyc` files, so by
default each command runs with a bytecode cache (`PYTHONPYCACHEPREFIX` under bench-data/, filled
by one untimed warm-up run per command), whatever `PYTHONDONTWRITEBYTECODE` says in the calling
shell. `--bytecode none` times the uncached case instead (every module compiled from source on
every run, as in a checkout whose environment sets PYTHONDONTWRITEBYTECODE).

    python -m benchmarks.validate_bench [--data DIR] [--order safetensors|module] [--repeat 5]
                                        [--bytecode cached|none] [--form nvfp4|fp8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.make_dsv3_checkpoint import FORMS, ORDERS, make_checkpoint

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = {"safetensors": REPO_ROOT / "bench-data" / "dsv3-nvfp4",
                "module": REPO_ROOT / "bench-data" / "dsv3-nvfp4-module-order"}
FP8_DATA = {"safetensors": REPO_ROOT / "bench-data" / "dsv3-fp8",
            "module": REPO_ROOT / "bench-data" / "dsv3-fp8-module-order"}
BUILT_MARKER = ".built"               # written last, so an interrupted build is redone
BUILD_FORMAT = 2                      # bump when make_checkpoint's output changes: rebuilds old data
LIMIT_S = 1.0                         # the design's budget for validating this checkpoint
PYCACHE = REPO_ROOT / "bench-data" / "pycache"   # --bytecode cached: .pyc files of every timed command
BYTECODE_MODES = ("cached", "none")

OPEN_ONLY = """
import sys
from quantgate.validators.checkpoint import open_checkpoint
view = open_checkpoint(sys.argv[1])
assert len(view.tensors) > 80_000 and not view.problems, view
assert "torch" not in sys.modules, "header-only path imported torch"
"""

NAIVE = """
import fnmatch, json, sys
from pathlib import Path
from safetensors import safe_open
root = Path(sys.argv[1])
if (root / "hf_quant_config.json").exists():
    exclude = json.loads((root / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    scale = ".weight_scale"
else:                       # native fp8: exclusions and the block scale suffix from config.json
    qc = json.loads((root / "config.json").read_text())["quantization_config"]
    exclude = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
    scale = ".weight_scale_inv"
names = set()
for shard in sorted(root.glob("*.safetensors")):
    with safe_open(str(shard), framework="pt") as f:
        names.update(f.keys())
bad = [n for n in names if n.endswith(".weight") and n[:-len(".weight")] + scale not in names
       and not any(fnmatch.fnmatch(n[:-len(".weight")], p) for p in exclude)]
print(len(names), len(bad))
"""


def ensure_checkpoint(data: Path, order: str = "safetensors", form: str = "nvfp4") -> Path:
    """Build the checkpoint once (reused across runs; rebuilt when the marker names another
    format, order or form, and after an interrupted build)."""
    marker = data / BUILT_MARKER
    stamp = f"format {BUILD_FORMAT} order {order}\n" + (f"form {form}\n" if form != "nvfp4" else "")
    if not marker.exists() or marker.read_text() != stamp:
        log.info("building %s (once)", data)
        marker.unlink(missing_ok=True)
        make_checkpoint(data, order=order, form=form)   # rewrites every shard, the index and the configs
        marker.write_text(stamp)
    return data


def quantgate_available() -> bool:
    return importlib.util.find_spec("quantgate.service.commands.validate") is not None


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def command_env(bytecode: str) -> dict[str, str]:
    """The environment of the timed commands: with a bytecode cache under bench-data/ (the
    installed case), or with bytecode caching off (every import compiled from source)."""
    env = dict(os.environ)
    if bytecode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def time_command(argv: list[str], repeat: int, ok_codes: tuple[int, ...] = (0,),
                 env: dict[str, str] | None = None, warmup: bool = False) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of `repeat` runs of `argv`; fails loudly on a bad exit.

    CPU time (user + sys of the child) is reported next to wall time because on a shared machine
    wall time also measures the neighbours; for these single-threaded runs it is what wall time
    would be on an idle machine. `warmup` runs the command once untimed first (fills the bytecode
    cache)."""
    walls, cpus = [], []
    for i in range(repeat + warmup):
        cpu = _children_cpu_s()
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False, env=env)
        wall, used = time.perf_counter() - start, _children_cpu_s() - cpu
        if done.returncode not in ok_codes:
            raise SystemExit(f"{' '.join(argv[:3])} ... exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')[-2000:]}")
        if i >= warmup:
            walls.append(wall)
            cpus.append(used)
    return walls, cpus


def time_interleaved(commands: dict[str, list[str]], repeat: int, env: dict[str, str], warmup: bool
                     ) -> dict[str, tuple[list[float], list[float]]]:
    """`time_command` for several commands, run in turns (A B A B ...) so that a change in the
    machine's load during the run falls on all of them alike."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in commands}
    for i in range(repeat):
        for name, argv in commands.items():
            wall, cpu = time_command(argv, 1, (0, 1), env, warmup and i == 0)
            out[name][0].extend(wall)
            out[name][1].extend(cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="checkpoint directory, built if absent (default bench-data/dsv3-nvfp4[-module-order])")
    parser.add_argument("--order", choices=ORDERS, default="safetensors",
                        help="data order inside a shard (default: as safetensors writes it)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument("--bytecode", choices=BYTECODE_MODES, default="cached",
                        help="run with a .pyc cache, as an installed package does (default), or none")
    parser.add_argument("--form", choices=FORMS, default="nvfp4",
                        help="nvfp4 (ModelOpt, default) or fp8: DeepSeek-V3's native fp8 block form, judged "
                             "against the NVFP4 form validated in the same run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    defaults = FP8_DATA if args.form == "fp8" else DEFAULT_DATA
    data = ensure_checkpoint((args.data or defaults[args.order]).resolve(), args.order, args.form)
    python = sys.executable
    load_before = os.getloadavg()[0]      # other jobs share the cores: wall times depend on them

    env, warmup = command_env(args.bytecode), args.bytecode == "cached"
    runs: dict[str, tuple[list[float], list[float]]] = {}
    if args.form == "fp8" and quantgate_available():
        nvfp4 = ensure_checkpoint(DEFAULT_DATA[args.order].resolve(), args.order)
        runs.update(time_interleaved({
            "quantgate validate": [python, "-m", "quantgate.service.cli", "validate", str(data), "--format", "json"],
            "quantgate validate (nvfp4 form)": [python, "-m", "quantgate.service.cli", "validate", str(nvfp4), "--format",
                                                "json"]}, args.repeat, env, warmup))
    elif quantgate_available():
        # exit 1 means "findings": still a complete validation
        runs["quantgate validate"] = time_command(
            [python, "-m", "quantgate.service.cli", "validate", str(data), "--format", "json"], args.repeat, (0, 1),
            env, warmup)
    runs["open_checkpoint"] = time_command([python, "-c", OPEN_ONLY, str(data)], args.repeat, env=env,
                                           warmup=warmup)
    runs["naive (safetensors+torch)"] = time_command([python, "-c", NAIVE, str(data)], args.repeat, env=env,
                                                     warmup=warmup)

    summary = {name: {"best_s": round(min(wall), 3), "median_s": round(statistics.median(wall), 3),
                      "cpu_best_s": round(min(cpu), 3), "cpu_median_s": round(statistics.median(cpu), 3)}
               for name, (wall, cpu) in runs.items()}
    width = max(map(len, summary))
    lines = [f"{'measurement':<{width}}  best (s)  median (s)  cpu best (s)  cpu median (s)"]
    lines += [f"{name:<{width}}  {s['best_s']:8.3f}  {s['median_s']:10.3f}  {s['cpu_best_s']:12.3f}  "
              f"{s['cpu_median_s']:14.3f}" for name, s in summary.items()]
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    decoder = json_decoder(env)
    lines.append(f"load average (1 min) before / after: {load[0]} / {load[1]}; bytecode: {args.bytecode}; "
                 f"JSON decoder: {decoder}")
    print("\n".join(lines))

    ours_name = "quantgate validate" if "quantgate validate" in runs else "open_checkpoint"
    ours = summary[ours_name]["median_s"]
    naive = summary["naive (safetensors+torch)"]["median_s"]
    passed, within_budget = judge(ours, naive)
    extra: dict[str, object] = {}
    reference = summary.get("quantgate validate (nvfp4 form)")
    if reference is not None:          # --form fp8: no slower than the NVFP4 form of the same model
        extra = {"vs_nvfp4_median": round(ours / reference["median_s"], 3),
                 "vs_nvfp4_cpu_median": round(summary[ours_name]["cpu_median_s"] / reference["cpu_median_s"], 3)}
        passed = passed and ours <= reference["median_s"]
    print(json.dumps({"benchmark": f"validate_dsv3_{args.form}", "order": args.order, "tensors": _tensor_count(data),
                      "repeat": args.repeat, "bytecode": args.bytecode, "json_decoder": decoder,
                      "load_average": load,
                      "results": summary, "judged": ours_name, "limit_s": LIMIT_S, "within_budget": within_budget,
                      **extra, "pass": passed}))
    if not within_budget:
        log.warning("%s median %.3f s: over the %.1f s budget at load average %s (reported, not a failure)",
                    ours_name, ours, LIMIT_S, load[0])
    if not passed:
        log.error("%s median %.3f s: slower than the naive check measured alongside (%.3f s) or than the "
                  "NVFP4 form", ours_name, ours, naive)
    return 0 if passed else 1


def judge(ours_s: float, naive_s: float) -> tuple[bool, bool]:
    """(pass, within_budget): pass compares two timings taken side by side in one run (a busy machine
    slows both); the absolute budget depends on the machine's load, so it is only reported."""
    return ours_s <= naive_s, ours_s <= LIMIT_S


def json_decoder(env: dict[str, str] | None = None) -> str:
    """Which JSON decoder the timed commands' header-only path uses: msgspec (a bare dependency)
    or the stdlib (asked of a child with the same environment)."""
    probe = "from validators import safetensors_fast as f; print(f.fast_json_loads is not None)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False)
    return "msgspec" if done.stdout.strip() == "True" else "json (stdlib)"


def _tensor_count(data: Path) -> int:
    return len(json.loads((data / "model.safetensors.index.json").read_text())["weight_map"])


if __name__ == "__main__":
    sys.exit(main())
