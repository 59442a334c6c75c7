"""The model card (`README.md`) pushed with a validated export.

Everything in it is read from the export itself, never guessed: the module counts from the
validation report's `summary.by_kind`, the verdicts from its `verdicts`, the scheme and dialect
from the report, the calibration facts from `calibration.json` metadata (absent for weight-only
schemes), the architecture from `config.json`. The YAML front matter carries what the Hub indexes:
`base_model` + `base_model_relation: quantized` (only when the source is a Hub repo id: a local
path is no model id), `library_name`, `pipeline_tag` and tags for the scheme and the dialect.
No timestamps, paths of the machine or secrets: the same export gives the same card, byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CardFacts", "render_card", "serve_commands"]

REPORT_FILE = "quantgate-report.json"
STATS_FILE = "calibration.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LIBRARY_NAME = "transformers"
#: `architectures[0]` suffix -> the Hub's pipeline tag (first match wins)
PIPELINE_TAGS: tuple[tuple[str, str], ...] = (
    ("ForConditionalGeneration", "image-text-to-text"),
    ("ForCausalLM", "text-generation"),
)
DEFAULT_PIPELINE_TAG = "text-generation"
#: the module states of the report summary, as the card words them
STATE_WORDS: tuple[tuple[str, str], ...] = (
    ("quantized", "quantized"),
    ("excluded", "kept BF16 (excluded)"),
    ("unquantized", "kept BF16"),
    ("bf16_not_excluded", "BF16 but not excluded"),
)
ENGINE_NAMES: dict[str, str] = {"vllm": "vLLM", "sglang": "SGLang"}


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond the export's own files."""

    repo_id: str                 # where it is pushed (org/name)
    revision: str | None         # the branch it is pushed to (None: main)
    source: str                  # what was quantized: a Hub repo id or a local path
    source_revision: str | None
    recipe: str
    version: str                 # quantgate version


def _pipeline_tag(config: dict) -> str:
    architectures = config.get("architectures") or []
    first = architectures[0] if architectures else ""
    for suffix, tag in PIPELINE_TAGS:
        if first.endswith(suffix):
            return tag
    return DEFAULT_PIPELINE_TAG


def _tag(word: str | None) -> str | None:
    return re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") if word else None


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quoting included


def serve_commands(repo_id: str, revision: str | None) -> dict[str, str]:
    """The launch commands for the pushed checkpoint; both engines read the quantization from
    config.json's `quantization_config`, so no `--quantization` flag is given."""
    rev = f" --revision {revision}" if revision else ""
    return {
        "vllm": f"vllm serve {repo_id}{rev}",
        "sglang": f"python -m sglang.launch_server --model-path {repo_id}{rev}",
    }


def _front_matter(facts: CardFacts, report: dict, config: dict) -> str:
    base = facts.source if HUB_ID.match(facts.source) else None
    tags = ["quantgate", "quantized", _tag(report.get("scheme")), _tag(report.get("dialect")),
            _tag(facts.recipe) if facts.recipe != (report.get("scheme") or "").lower() else None]
    lines = ["---"]
    if base:
        lines += [f"base_model: {_yaml_str(base)}", "base_model_relation: quantized"]
    lines += [f"library_name: {LIBRARY_NAME}", f"pipeline_tag: {_pipeline_tag(config)}", "tags:"]
    lines += [f"- {_yaml_str(tag)}" for tag in dict.fromkeys(t for t in tags if t)]
    lines.append("---")
    return "\n".join(lines)


def _modules_table(summary: dict) -> list[str]:
    by_kind: dict[str, dict[str, int]] = summary.get("by_kind") or {}
    states = [(key, word) for key, word in STATE_WORDS if any(c.get(key) for c in by_kind.values())]
    rows = ["| module kind | " + " | ".join(word for _, word in states) + " |",
            "|---|" + "---:|" * len(states)]
    for kind, counts in by_kind.items():
        rows.append(f"| {kind} | " + " | ".join(str(counts.get(key, 0)) for key, _ in states) + " |")
    totals = summary.get("totals") or {}
    rows.append("| **all** | " + " | ".join(f"**{totals.get(key, 0)}**" for key, _ in states) + " |")
    return rows


def _calibration(stats: dict | None) -> str:
    if stats is None:
        return "No calibration: the scheme needs no activation scales (weight-only), so no data was run."
    meta = stats.get("metadata") or {}
    data = meta.get("data", "unknown")
    described = "random token ids" if data == "random" else f"`{Path(str(data)).name}`" \
        if "/" in str(data) and not HUB_ID.match(str(data)) else f"`{data}`"
    parts = [f"{meta.get('samples', '?')} samples of {meta.get('seq_len', '?')} tokens from {described}"]
    if meta.get("tokens"):
        parts.append(f"{meta['tokens']} tokens in all")
    if "all_experts" in meta:
        parts.append("every token also routed through every expert" if meta["all_experts"]
                     else "tokens routed as the model routes them")
    return "Activation scales were calibrated on " + "; ".join(parts) + "."


def _verdicts(report: dict) -> list[str]:
    rows = ["| engine | verdict | why |", "|---|---|---|"]
    for engine, verdict in (report.get("verdicts") or {}).items():
        reason = str(verdict.get("reason", "")).replace("|", "\\|")
        rows.append(f"| {ENGINE_NAMES.get(engine, engine)} | **{verdict.get('status')}** | {reason} |")
    return rows


def render_card(folder: Path, facts: CardFacts) -> str:
    """The README.md text for the export in `folder` (which holds quantgate-report.json)."""
    report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    stats_path = folder / STATS_FILE
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else None
    summary = report.get("summary") or {}
    scheme, dialect = report.get("scheme") or "unknown", report.get("dialect") or "unknown"
    name = facts.repo_id.split("/")[-1]
    source = facts.source if HUB_ID.match(facts.source) else f"a local checkpoint (`{Path(facts.source).name}`)"
    source_link = f"[{facts.source}](https://huggingface.co/{facts.source})" if HUB_ID.match(facts.source) else source
    at = f" at revision `{facts.source_revision}`" if facts.source_revision else ""
    commands = serve_commands(facts.repo_id, facts.revision)
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    counts = report.get("counts") or {}
    lines = [
        _front_matter(facts, report, config),
        "",
        f"# {name}",
        "",
        f"{scheme} quantization of {source_link}{at} ({architecture}), written in the **{dialect}** "
        f"format by quantgate {facts.version} with recipe "
        f"`{facts.recipe}`, and validated against the loaders of vLLM and SGLang before it was pushed.",
        "",
        "## What was quantized",
        "",
        f"{summary.get('modules', '?')} weight-bearing modules in {summary.get('tensors', '?')} tensors "
        f"({summary.get('files', '?')} safetensors file(s)), by kind:",
        "",
        *_modules_table(summary),
        "",
        "## Calibration",
        "",
        _calibration(stats),
        "",
        "## Validation",
        "",
        f"Header-only validation of this exact checkpoint: {counts.get('error', 0)} error(s), "
        f"{counts.get('warning', 0)} warning(s), {counts.get('info', 0)} note(s). Predicted verdict per engine:",
        "",
        *_verdicts(report),
        "",
        f"The full report is attached: [`{REPORT_FILE}`]({REPORT_FILE}) and "
        "[`quantgate-report.html`](quantgate-report.html).",
        "",
        "## Serve it",
        "",
        "```bash",
        commands["vllm"],
        "```",
        "",
        "```bash",
        commands["sglang"],
        "```",
        "",
        "Both engines read the quantization from `config.json`; no `--quantization` flag is needed.",
        "",
        f"_Made with quantgate {facts.version}._",
        "",
    ]
    return "\n".join(lines)
