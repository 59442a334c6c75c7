"""Load checkpoints in vLLM, generate greedily, print top-k log-probabilities as JSON (one line per model).

Run with a Python that has vLLM (the CPU build works): it needs nothing from quantgate.

    python vllm_driver.py '{"models": ["/path/a", "/path/b"], "prompts": [[5, 17, 99]], "max_tokens": 4,
                            "logprobs": 5}'

Each output line is `{"model": path, "vllm": version, "quantization": ..., "outputs": [[step, ...], ...]}`
where each step is `{"token": id, "top": {token_id: logprob, ...}}`. vLLM starts its engine core with
the `spawn` method, hence the `__main__` guard.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys

log = logging.getLogger("vllm_driver")

DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run_model(path: str, prompts: list[list[int]], max_tokens: int, logprobs: int) -> dict:
    """Greedy generation with top-`logprobs` log-probabilities for every generated step."""
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs)
        results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        quant = getattr(llm.llm_engine.model_config, "quantization", None)
        outputs = []
        for result in results:
            steps = []
            completion = result.outputs[0]
            for token, top in zip(completion.token_ids, completion.logprobs or []):
                steps.append({"token": int(token), "top": {str(t): float(lp.logprob) for t, lp in top.items()}})
            outputs.append(steps)
        return {"model": path, "vllm": vllm.__version__, "quantization": quant, "outputs": outputs}
    finally:
        del llm
        gc.collect()


def probe() -> dict:
    """What this vLLM can run: its version and whether the CPU has AMX tiles (vLLM CPU's quantized
    MoE kernels, int4 and int8, require them; dense W4A16 / W8A8 kernels do not)."""
    import torch
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "amx": bool(torch.cpu._is_amx_tile_supported())}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    if spec.get("probe"):
        sys.stdout.write("QUANTGATE_PROBE " + json.dumps(probe()) + "\n")
        return 0
    for path in spec["models"]:
        record = run_model(path, spec["prompts"], int(spec.get("max_tokens", 4)), int(spec.get("logprobs", 5)))
        sys.stdout.write("QUANTGATE_RESULT " + json.dumps(record) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv))
