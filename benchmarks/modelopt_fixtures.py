"""Make the ModelOpt-on-CUDA fixtures: ModelOpt 0.47 quantizes a small real Gemma4 MoE on a GPU.

    PYTHONPATH=/tmp/mo:. python3 -m benchmarks.modelopt_fixtures --out tests/exporter/fixtures/modelopt_cuda

Needs CUDA and ModelOpt 0.47 (see BENCHMARKS.md, "ModelOpt side by side", for the wheels). Writes:

- `source/`: the checkpoint (config.json + model.safetensors, BF16): a Gemma4ForCausalLM with hidden
  512, one layer, 2 fused experts (`experts.gate_up_proj` [2, 64, 512], `experts.down_proj`
  [2, 512, 32]), dense MLP 64, vocab 128. Every matrix is N(0, 0.02^2) from its own seed (so the
  amaxes differ; transformers' truncated init gives nearly one amax for all). Three weights get one
  planted element (the largest of the tensor) whose amax makes `amax / d` and `amax * fl32(1/d)`
  differ for d = 2688 and 448, so the fixture pins the CUDA rounding of `weight_scale_2` and the FP8
  `weight_scale` (q_proj, expert 0's gate_up, the dense down_proj).
- `modelopt_<recipe>.safetensors` (recipe nvfp4 / fp8): every tensor ModelOpt exported for a
  quantized module (`weight`, `weight_scale`, `weight_scale_2`, `input_scale`), metadata = versions.
- `modelopt_<recipe>_calibration.json`: the input amax ModelOpt calibrated, per exported module name,
  in quantgate's activation-stats format, so a quantgate export given the same amax can be compared.

Calibration: 8 x 64 random token ids (seed 0), `mtq.NVFP4_DEFAULT_CFG` / `mtq.FP8_DEFAULT_CFG`,
then `export_hf_checkpoint`, each recipe on a freshly loaded model.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("modelopt_fixtures")

FIXTURE_MODEL: dict[str, Any] = {"hidden": 512, "layers": 1, "experts": 2, "top_k_experts": 1,
                                 "moe_intermediate": 32, "intermediate": 64, "vocab": 512, "heads": 2,
                                 "kv_heads": 1, "head_dim": 64, "global_head_dim": 64}
FIXTURE_VOCAB = 128   # keeps the embedding (copied, never quantized) small in the fixture
#: Weights that get a planted amax; value: the fused-expert index (None: a 2-D weight).
PLANTED: dict[str, int | None] = {
    "model.layers.0.self_attn.q_proj.weight": None,
    "model.layers.0.experts.gate_up_proj": 0,
    "model.layers.0.mlp.down_proj.weight": None,
}
CALIB_BATCHES, CALIB_BATCH, CALIB_SEQ = 1, 8, 64
RECIPE_CONFIGS: dict[str, str] = {"nvfp4": "NVFP4_DEFAULT_CFG", "fp8": "FP8_DEFAULT_CFG"}
EXPORTED_SUFFIXES: tuple[str, ...] = ("weight", "weight_scale", "weight_scale_2", "input_scale")
SCALE_DIVISORS: tuple[float, ...] = (2688.0, 448.0)   # NVFP4 weight_scale_2, FP8 weight_scale
INIT_STD = 0.02


def cuda_differs(amax: float) -> bool:
    """Whether ModelOpt's CUDA scales (amax * fl32(1/d)) differ from amax / d (fp32) for every d."""
    a = torch.tensor(amax, dtype=torch.float32)
    return all(bool(a * (torch.tensor(1.0) / torch.tensor(d)) != a / torch.tensor(d)) for d in SCALE_DIVISORS)


def planted_amax(above: float) -> float:
    """The smallest BF16 value > `above` for which `cuda_differs` holds."""
    v = torch.tensor(above, dtype=torch.bfloat16).view(torch.int16)   # positive: bit order = value order
    while True:
        v = v + 1   # the next BF16 value up
        value = float(v.view(torch.bfloat16))
        if value > above and cuda_differs(value):
            return value


def build_source(out: Path) -> Path:
    from quantgate.exporter.testkit import tiny_models

    config = tiny_models.tiny_config("gemma4", **FIXTURE_MODEL)
    # no tokenizer is saved, so the vocabulary can be smaller than tiny_models' tokenizer allows
    config.vocab_size = config.vocab_size_per_layer_input = FIXTURE_VOCAB
    cls = tiny_models._transformers().Gemma4ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls._from_config(config, dtype=torch.bfloat16).eval()
    state = model.state_dict()
    for i, name in enumerate(sorted(state)):
        if state[name].ndim >= 2:   # matrices and stacked experts; norms and scalars keep their init
            gen = torch.Generator().manual_seed(i)
            state[name].copy_(torch.randn(state[name].shape, generator=gen) * INIT_STD)
    for name, expert in PLANTED.items():
        w = state[name] if expert is None else state[name][expert]
        value = planted_amax(float(w.abs().max()) * 1.25)
        w.view(-1)[0] = value
        log.info("planted amax %r in %s (expert %s)", value, name, expert)
    model.save_pretrained(out)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
    return out


def _input_amax(model: torch.nn.Module) -> dict[str, float]:
    """Every calibrated input quantizer's amax: `<module>.<attr>` -> float."""
    amax: dict[str, float] = {}
    for mname, module in model.named_modules():
        for attr, child in module.named_children():
            if attr.endswith("input_quantizer") and getattr(child, "_amax", None) is not None:
                amax[f"{mname}.{attr}"] = float(child._amax.float().max())
    return amax


def amax_for(exported_module: str, amax: dict[str, float]) -> float:
    """The input amax behind one exported module's input_scale (dense: its own quantizer; a fused
    expert's gate/up or down: the experts module's shared quantizer)."""
    if f"{exported_module}.input_quantizer" in amax:
        return amax[f"{exported_module}.input_quantizer"]
    m = re.fullmatch(r"(.*)\.\d+\.(gate_proj|up_proj|down_proj)", exported_module)
    if m is None:
        raise KeyError(exported_module)
    attr = "down_proj_input_quantizer" if m.group(2) == "down_proj" else "gate_up_proj_input_quantizer"
    return amax[f"{m.group(1)}.{attr}"]


def run_modelopt(source: Path, recipe: str, export_dir: Path) -> dict[str, float]:
    """Quantize + export `source` with ModelOpt on CUDA; returns input amax per exported module."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map="cuda").eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    batches = [torch.randint(0, vocab, (CALIB_BATCH, CALIB_SEQ), generator=gen) for _ in range(CALIB_BATCHES)]

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for b in batches:
                m(input_ids=b.cuda())

    mtq.quantize(model, getattr(mtq, RECIPE_CONFIGS[recipe]), forward_loop)
    amax = _input_amax(model)
    export_hf_checkpoint(model, export_dir=export_dir)
    return amax


def collect(export_dir: Path, amax: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The exported tensors of quantized modules, and the input amax of each such module."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    modules = {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}
    kept = {k: v.contiguous() for k, v in tensors.items()
            if k.rsplit(".", 1)[0] in modules and k.rsplit(".", 1)[1] in EXPORTED_SUFFIXES}
    module_amax = {m: amax_for(m, amax) for m in sorted(modules) if f"{m}.input_scale" in kept}
    return kept, module_amax


def versions() -> dict[str, str]:
    import modelopt
    import transformers

    return {"modelopt": modelopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(0)}


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from quantgate.exporter.calibration.stats import ActivationStats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    source = build_source(out / "source")
    meta = versions()
    for recipe, config in RECIPE_CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            amax = run_modelopt(source, recipe, Path(tmp))
            tensors, module_amax = collect(Path(tmp), amax)
        save_file(tensors, str(out / f"modelopt_{recipe}.safetensors"),
                  metadata={**meta, "config": config,
                            "calibration": f"{CALIB_BATCHES}x{CALIB_BATCH}x{CALIB_SEQ} random ids, seed 0"})
        stats = ActivationStats(amax=module_amax, metadata={"model": "modelopt_cuda fixture", "producer": "modelopt",
                                                            **meta})
        stats.save(out / f"modelopt_{recipe}_calibration.json")
        log.info("%s: %d tensors of %d modules", recipe, len(tensors), len(module_amax))
    (out / "README.md").write_text(
        "ModelOpt 0.47 run on CUDA over `source/`; made by `python -m benchmarks.modelopt_fixtures`.\n"
        f"```json\n{json.dumps(meta, indent=1)}\n```\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
