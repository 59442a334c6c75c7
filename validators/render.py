"""Render a `Report` as text (colour only on request), JSON, Markdown or a self-contained HTML page."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO

from quantgate.validators.findings import Finding, Severity
from quantgate.validators.grouping import fold_names
from quantgate.validators.report import Report

FORMATS: tuple[str, ...] = ("text", "json", "markdown", "html")
MAX_MODULE_LINES = 6                      # folded module lines shown per finding in text/markdown
SUMMARY_STATES: tuple[str, ...] = ("quantized", "excluded", "bf16_not_excluded", "unquantized")

_ANSI = {"red": "\033[31m", "yellow": "\033[33m", "green": "\033[32m", "magenta": "\033[35m", "dim": "\033[2m",
         "bold": "\033[1m", "reset": "\033[0m"}
SEVERITY_COLOR = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
STATUS_COLOR = {"loads": "green", "fails": "red", "loads_wrong": "yellow", "unknown": "magenta"}
#: extra words after a verdict status in Markdown (`unknown` must not read like a pass or a failure)
STATUS_WORDS = {"unknown": "not modelled: no prediction"}


def use_color(stream: IO[str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def rule_name(code: str) -> str:
    from quantgate.validators.rules import RULES, load_rules

    load_rules()
    rule = RULES.get(code)
    return rule.name if rule else ""


def module_lines(f: Finding, limit: int = MAX_MODULE_LINES) -> list[str]:
    lines = fold_names(f.modules)
    if len(lines) > limit:
        return lines[:limit] + [f"... and {len(lines) - limit} more group(s)"]
    return lines


def render_text(report: Report, color: bool = False) -> str:
    def paint(text: str, name: str) -> str:
        return f"{_ANSI[name]}{text}{_ANSI['reset']}" if color else text

    out: list[str] = []
    s = report.summary
    what = f"{report.dialect or 'unquantized'}{' ' + report.scheme if report.scheme else ''}"
    out.append(paint(f"quantgate validate {report.target}", "bold"))
    out.append(f"  {what}; {s['modules']:,} modules, {s['tensors']:,} tensors, {s['files']} file(s); "
               f"deep scale checks {'on' if report.deep else 'off'}")
    out.append("")
    out.append(paint("Verdict", "bold"))
    for engine, v in report.verdicts.items():
        status = v["status"]
        label = f"{engine} {v.get('engine_version') or ''}".strip()
        out.append(f"  {label:<14} {paint(status.upper().ljust(11), STATUS_COLOR.get(status, 'bold'))} {v['reason']}")
    if report.unknown_engines:
        out.append(paint(f"  unknown = quantgate does not model this format for {', '.join(report.unknown_engines)}: "
                         "no prediction either way (--strict makes it fail)", "magenta"))
    if report.deployment:
        d = report.deployment
        out.append(f"  at tensor-parallel size {d['tensor_parallel_size']}"
                   f"{' with expert parallelism' if d['expert_parallel'] else ''}")
    counts = report.counts()
    out.append("")
    out.append(paint(f"Findings ({counts['error']} error, {counts['warning']} warning, {counts['info']} info)", "bold"))
    if not report.findings:
        out.append("  none")
    for f in report.findings:
        head = f"{f.severity.value.upper():<7} {f.code} {rule_name(f.code)}"
        out.append("  " + paint(head, SEVERITY_COLOR[f.severity]) + paint(f"  [{', '.join(f.engines)}]", "dim"))
        out.append(f"          {f.message}")
        for line in module_lines(f):
            out.append(f"          - {line}")
        if f.predicted_error:
            out.append(f"          engine: {f.predicted_error}")
        if f.fix:
            out.append(f"          fix: {f.fix}")
    out.append("")
    out.append(paint("Modules by kind", "bold"))
    header = f"  {'kind':<14}" + "".join(f"{st:>19}" for st in SUMMARY_STATES)
    out.append(header)
    for kind, row in s["by_kind"].items():
        out.append(f"  {kind:<14}" + "".join(f"{row.get(st, 0):>19,}" for st in SUMMARY_STATES))
    return "\n".join(out) + "\n"


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    s = report.summary
    out = [f"# quantgate validate `{report.target}`", "",
           f"{report.dialect or 'unquantized'} {report.scheme or ''} — {s['modules']:,} modules, "
           f"{s['tensors']:,} tensors, {s['files']} file(s)", "", "## Verdict", "",
           "| engine | status | reason | release |", "|---|---|---|---|"]
    for engine, v in report.verdicts.items():
        words = STATUS_WORDS.get(v["status"])
        label = f"**{v['status']}**" + (f" ({words})" if words else "")
        out.append(f"| {engine} | {label} | {_md_escape(v['reason'])} | {v.get('engine_version') or ''} |")
    if report.unknown_engines:
        out += ["", f"> **unknown** for {', '.join(report.unknown_engines)}: quantgate does not model this "
                "checkpoint's quantization format, so it neither passes nor fails it (`--strict` treats it "
                "as a failure)."]
    out += ["", "## Findings", ""]
    if not report.findings:
        out.append("None.")
    for f in report.findings:
        out.append(f"### {f.severity.value} {f.code} {rule_name(f.code)} ({', '.join(f.engines)})")
        out.append("")
        out.append(_md_escape(f.message))
        out.append("")
        out.append("```")
        out.extend(module_lines(f))
        out.append("```")
        if f.predicted_error:
            out.append(f"- engine: `{_md_escape(f.predicted_error)}`")
        if f.fix:
            out.append(f"- fix: {_md_escape(f.fix)}")
        out.append("")
    out += ["## Modules by kind", "", "| kind | " + " | ".join(SUMMARY_STATES) + " |",
            "|---|" + "---:|" * len(SUMMARY_STATES)]
    for kind, row in s["by_kind"].items():
        out.append(f"| {kind} | " + " | ".join(f"{row.get(st, 0):,}" for st in SUMMARY_STATES) + " |")
    return "\n".join(out) + "\n"


def render_html(report: Report) -> str:
    from quantgate.validators.render_html import render_html as _html

    return _html(report)


RENDERERS: dict[str, Callable[[Report], str]] = {
    "json": render_json, "markdown": render_markdown, "html": render_html,
}


def render(report: Report, fmt: str, *, color: bool = False) -> str:
    if fmt == "text":
        return render_text(report, color=color)
    return RENDERERS[fmt](report)

