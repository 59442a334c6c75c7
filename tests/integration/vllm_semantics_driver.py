"""Answer name-mapping and exclusion questions with vLLM's own functions (runs inside vLLM's venv).

Reads one JSON object on stdin and prints one JSON object (a line starting with `QUANTGATE_ANSWER `):
  {"map": [[arch, name], ...]}               -> the model's hf_to_vllm_mapper.map_name(name) (None: dropped)
  {"excluded": [[arch, prefix, patterns]]}    -> ModelOptNvFp4Config.is_layer_excluded(prefix) after
                                                 apply_vllm_mapper(model mapper); "conflict" on ValueError
  {"skipped": [[prefix, patterns, packed]]}   -> quant_utils.is_layer_skipped(prefix, patterns, packed)
  {"config": [[form, quant_algo]]}           -> does vLLM accept a ModelOpt config declaring it (`_accepts`)
Needs nothing from quantgate. Model classes whose module cannot be imported on this machine (e.g. the
multimodal ones need torchvision) have their mapper and packed mapping read from the class body in
the installed source with `ast` (literal dicts only) and fed to vLLM's own WeightsMapper.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _class_literals(arch: str) -> tuple[dict | None, dict | None]:
    """(WeightsMapper kwargs, packed_modules_mapping) of `arch` from the installed source, via ast; the
    class's bases in the same module are searched too. None where the source is not a literal."""
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module_name, class_name = _VLLM_MODELS[arch]
    spec = importlib.util.find_spec("vllm.model_executor.models")
    path = Path(spec.submodule_search_locations[0]) / f"{module_name}.py"
    classes = {n.name: n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
    found: dict[str, object] = {}
    todo = [class_name]
    while todo:
        node = classes.get(todo.pop(0))
        if node is None:
            continue
        for stmt in node.body:
            target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
            name = getattr(target, "id", None)
            if name in ("hf_to_vllm_mapper", "packed_modules_mapping") and name not in found:
                try:
                    if name == "hf_to_vllm_mapper":
                        if not (isinstance(stmt.value, ast.Call) and getattr(stmt.value.func, "id", "") == "WeightsMapper"):
                            raise ValueError("not a literal WeightsMapper(...)")
                        found[name] = {k.arg: ast.literal_eval(k.value) for k in stmt.value.keywords}
                    else:
                        found[name] = ast.literal_eval(stmt.value)
                except ValueError:
                    found[name] = None
        todo.extend(getattr(b, "id", "") for b in node.bases)
    return found.get("hf_to_vllm_mapper", {}), found.get("packed_modules_mapping")  # type: ignore[return-value]


_MODELS: dict = {}


def model(arch: str | None):
    """(WeightsMapper or None, packed mapping) of an architecture."""
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.model_executor.models.utils import WeightsMapper

    if arch is None:
        return None, DEFAULT_PACKED
    if arch not in _MODELS:
        try:
            cls = ModelRegistry._try_load_model_cls(arch)
        except Exception:  # noqa: BLE001 - an import failure of the model module: read its source
            cls = None
        if cls is not None:
            _MODELS[arch] = (getattr(cls, "hf_to_vllm_mapper", None),
                             dict(getattr(cls, "packed_modules_mapping", None) or DEFAULT_PACKED))
        else:
            kwargs, packed = _class_literals(arch)
            mapper = "unresolved" if kwargs is None else (WeightsMapper(**kwargs) if kwargs else None)
            _MODELS[arch] = (mapper, packed or DEFAULT_PACKED)
    return _MODELS[arch]


def _accepts(form: str, algo: str) -> bool:
    """Does vLLM accept a ModelOpt checkpoint declaring `algo`? `form` "flat": config.json
    quantization_config (quant_method modelopt); "legacy": hf_quant_config.json only (nested), which
    goes through ModelArchConfigConvertorBase._normalize_quantization_config first. The config class
    is the first whose override_quantization_method claims it (else ModelOptFp8Config, quant_method
    "modelopt"), then its from_config must not raise."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.quantization import modelopt as mo
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    body = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": []}
    if algo.upper() == "MIXED_PRECISION":
        body["quantized_layers"] = {"model.layers.0.mlp.down_proj": {"quant_algo": "NVFP4", "group_size": 16}}
    if form == "legacy":
        cfg = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": body}
        try:
            ModelArchConfigConvertorBase._normalize_quantization_config(None, SimpleNamespace(quantization_config=cfg))
        except ValueError:
            return False
    else:
        cfg = {"quant_method": "modelopt", "quant_algo": algo, "ignore": [], "group_size": 16,
               "kv_cache_scheme": None, **({"quantized_layers": body["quantized_layers"]}
                                           if "quantized_layers" in body else {})}
    classes = [c for c in vars(mo).values() if isinstance(c, type) and issubclass(c, mo.ModelOptQuantConfigBase)
               and c is not mo.ModelOptQuantConfigBase and "override_quantization_method" in vars(c)]
    owner = next((c for c in classes if c.override_quantization_method(cfg, None)), mo.ModelOptFp8Config)
    try:
        owner.from_config(cfg)
    except ValueError:
        return False
    return True


def main() -> None:
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    request = json.loads(sys.stdin.read())
    answer: dict = {"map": [], "excluded": [], "skipped": []}
    for arch, name in request.get("map", []):
        mapper, _ = model(arch)
        answer["map"].append("unresolved" if mapper == "unresolved" else
                             mapper.map_name(name) if mapper is not None else name)
    for arch, prefix, patterns in request.get("excluded", []):
        cfg = ModelOptNvFp4Config.from_config({"quant_method": "modelopt", "quant_algo": "NVFP4",
                                               "ignore": list(patterns), "group_size": 16})
        mapper, packed = model(arch)
        if mapper == "unresolved":
            answer["excluded"].append("unresolved")
            continue
        if mapper is not None:
            cfg.apply_vllm_mapper(mapper)
        else:                                   # the `x*` split happens inside apply_vllm_mapper
            from vllm.model_executor.models.utils import WeightsMapper
            cfg.apply_vllm_mapper(WeightsMapper())
        cfg.packed_modules_mapping = packed
        try:
            answer["excluded"].append(cfg.is_layer_excluded(prefix))
        except ValueError:
            answer["excluded"].append("conflict")
    for prefix, patterns, packed in request.get("skipped", []):
        try:
            answer["skipped"].append(is_layer_skipped(prefix, list(patterns), packed))
        except ValueError:
            answer["skipped"].append("conflict")
    answer["config"] = [_accepts(form, algo) for form, algo in request.get("config", [])]
    import vllm

    answer["vllm"] = vllm.__version__
    print("QUANTGATE_ANSWER " + json.dumps(answer))


if __name__ == "__main__":
    main()
