"""Self-contained HTML report: verdicts, findings, and a picture of where quantization is (and isn't).

The picture is an inline SVG: one row per decoder layer (plus one for modules outside layers),
columns grouped by kind (attention, MLP / shared experts, router, other), and the routed experts
as a strip of small cells per layer, coloured by state, so BF16 experts stand out at a glance.
No external assets, no JavaScript.
"""

from __future__ import annotations

import html
from collections import defaultdict

from quantgate.validators.findings import Severity
from quantgate.validators.report import ModuleRow, Report

STATE_COLORS: dict[str, str] = {
    "quantized": "#2e7d32", "excluded": "#a7a7a7", "bf16_not_excluded": "#f9a825", "unquantized": "#90caf9",
    "error": "#c62828",
}
STATE_LABELS: dict[str, str] = {
    "quantized": "quantized", "excluded": "excluded (BF16 by design)", "bf16_not_excluded": "BF16, not excluded",
    "unquantized": "unquantized checkpoint", "error": "has an error finding",
}
#: worst state wins when several modules share one cell (an expert's gate/up/down)
STATE_RANK: dict[str, int] = {"bf16_not_excluded": 0, "error": 1, "quantized": 2, "unquantized": 3, "excluded": 4}
TITLE_CHAR_W = 6.5      # px per character of a column title (10px monospace)
COLUMN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("attention",)), ("mlp / shared", ("mlp", "shared_expert")), ("router", ("router",)),
    ("other", ("other",)),
)
GLOBAL_KINDS: tuple[str, ...] = ("embedding", "lm_head", "vision", "projector", "other", "norm")
CELL = 9                # px, one module cell
ROW = 12                # px, one layer row
LABEL_W = 64            # px, layer label column
GAP = 14                # px between column groups
MAX_STRIP = 720         # px, width budget of the expert strip
STATUS_COLORS = {"loads": "#2e7d32", "fails": "#c62828", "loads_wrong": "#ef6c00", "unknown": "#6a4c93"}
#: the headline word of each status card; `unknown` says plainly that no prediction was made
STATUS_HEADLINES = {"unknown": "unknown: not modelled"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.sub{color:#555;margin-bottom:16px} code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
.verdicts{display:flex;gap:12px;flex-wrap:wrap}
.verdict{border-radius:8px;padding:10px 14px;color:#fff;min-width:260px;max-width:560px}
.verdict b{font-size:15px;text-transform:uppercase;margin-right:8px} .verdict div{font-size:12px;opacity:.95;word-break:break-word}
table{border-collapse:collapse;margin-top:6px} th,td{border-bottom:1px solid #e5e5e5;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev{font-weight:700;text-transform:uppercase;font-size:11px;border-radius:4px;padding:2px 6px;color:#fff}
.sev.error{background:#c62828}.sev.warning{background:#ef6c00}.sev.info{background:#78909c}
.legend{display:flex;gap:16px;flex-wrap:wrap;margin:6px 0 10px}.legend span{display:inline-flex;align-items:center;gap:6px}
.sw{width:12px;height:12px;border-radius:2px;display:inline-block}
.mods{margin:4px 0 0;padding:6px 8px;background:#fafafa;border:1px solid #eee;max-height:160px;overflow:auto}
.fix{color:#1b5e20}.eng{color:#8e0000}
.unknown-note{border-left:4px solid #6a4c93;background:#f3eef8;padding:8px 12px;max-width:820px}
svg text{font:10px ui-monospace,Menlo,monospace;fill:#444}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell_state(r: ModuleRow) -> str:
    """BF16-not-excluded shows as such (the picture's point); other modules with an error are red."""
    return "error" if r.error and r.state != "bf16_not_excluded" else r.state


def _worst(states: list[str]) -> str:
    return min(states, key=lambda s: STATE_RANK.get(s, 9))


def _grid(rows: list[ModuleRow]) -> str:
    """The layers x kinds picture as an inline SVG."""
    layers: dict[int, dict[str, list[ModuleRow]]] = defaultdict(lambda: defaultdict(list))
    experts: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    global_rows: list[ModuleRow] = []
    for r in rows:
        if r.kind == "norm":
            continue
        if r.layer is None or r.kind in ("embedding", "lm_head", "vision", "projector"):
            global_rows.append(r)
        elif r.kind == "expert" and r.expert is not None:
            experts[r.layer][r.expert].append(_cell_state(r))
        else:
            layers[r.layer][r.kind].append(r)
    if not layers and not experts and not global_rows:
        return "<p>No weight-bearing modules.</p>"
    layer_ids = sorted(set(layers) | set(experts))
    widths = {title: max((sum(len(layers[li][k]) for k in kinds) for li in layer_ids), default=0)
              for title, kinds in COLUMN_GROUPS}
    n_experts = max((max(e) + 1 for e in experts.values() if e), default=0)
    expert_w = max(2, min(CELL, MAX_STRIP // n_experts)) if n_experts else 0
    x = LABEL_W
    starts: dict[str, int] = {}
    for title, _ in COLUMN_GROUPS:
        if widths[title]:
            starts[title] = x
            x += int(max(widths[title] * CELL, len(title) * TITLE_CHAR_W)) + GAP
    strip_x = x
    width = int(strip_x + max(n_experts * expert_w, 26 * TITLE_CHAR_W if n_experts else 0)) + 10
    top = 30
    height = top + (len(layer_ids) + 2) * ROW + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="module states by layer">']
    for title, sx in starts.items():
        parts.append(f'<text x="{sx}" y="{top - 8}">{_e(title)}</text>')
    if n_experts:
        parts.append(f'<text x="{strip_x}" y="{top - 8}">routed experts 0..{n_experts - 1}</text>')

    def rect(x0: int, y0: int, w: int, state: str, tip: str) -> str:
        return (f'<rect x="{x0}" y="{y0}" width="{w - 1}" height="{ROW - 2}" fill="{STATE_COLORS.get(state, "#000")}">'
                f'<title>{_e(tip)}</title></rect>')

    for i, layer in enumerate(layer_ids):
        y = top + i * ROW
        parts.append(f'<text x="4" y="{y + ROW - 3}">L{layer}</text>')
        for title, kinds in COLUMN_GROUPS:
            if title not in starts:
                continue
            cells = [r for k in kinds for r in sorted(layers[layer][k], key=lambda r: r.name)]
            for j, r in enumerate(cells):
                st = _cell_state(r)
                parts.append(rect(starts[title] + j * CELL, y, CELL, st,
                                  f"{r.name}: {STATE_LABELS.get(st, st)}{' ' + r.scheme if r.scheme else ''}"))
        for e, states in sorted(experts.get(layer, {}).items()):
            state = _worst(states)
            parts.append(rect(strip_x + e * expert_w, y, expert_w, state,
                              f"layer {layer} expert {e}: {STATE_LABELS.get(state, state)}"))
    y = top + (len(layer_ids) + 0.5) * ROW
    parts.append(f'<text x="4" y="{int(y + ROW - 3)}">global</text>')
    for j, r in enumerate(sorted(global_rows, key=lambda r: r.name)[: (width - LABEL_W) // CELL]):
        st = _cell_state(r)
        parts.append(rect(LABEL_W + j * CELL, int(y), CELL, st, f"{r.name} ({r.kind}): {STATE_LABELS.get(st, st)}"))
    parts.append("</svg>")
    return "".join(parts)


def _legend(rows: list[ModuleRow]) -> str:
    present = {_cell_state(r) for r in rows}
    items = [f'<span><i class="sw" style="background:{STATE_COLORS[s]}"></i>{_e(STATE_LABELS[s])}</span>'
             for s in STATE_COLORS if s in present or s in ("quantized", "bf16_not_excluded", "excluded")]
    return '<div class="legend">' + "".join(items) + "</div>"


def render_html(report: Report) -> str:
    from quantgate.validators.render import SUMMARY_STATES, module_lines, rule_name

    s = report.summary
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           f"<title>quantgate: {_e(report.target)}</title><style>{CSS}</style></head><body>",
           f"<h1>quantgate validate <code>{_e(report.target)}</code></h1>",
           f'<div class="sub">{_e(report.dialect or "unquantized")} {_e(report.scheme or "")} &middot; '
           f"{s['modules']:,} modules &middot; {s['tensors']:,} tensors &middot; {s['files']} file(s) &middot; "
           f"deep scale checks {'on' if report.deep else 'off'}</div>", '<div class="verdicts">']
    for engine, v in report.verdicts.items():
        status = v["status"]
        release = _e(" " + v["engine_version"]) if v.get("engine_version") else ""
        out.append(f'<div class="verdict {_e(status)}" style="background:{STATUS_COLORS.get(status, "#455a64")}">'
                   f'<b>{_e(engine)}{release}</b>{_e(STATUS_HEADLINES.get(status, status))}'
                   f'<div>{_e(v["reason"])}</div></div>')
    if report.unknown_engines:
        out.append('<p class="unknown-note">No prediction for ' + _e(", ".join(report.unknown_engines)) +
                   ": quantgate does not model this checkpoint's quantization format, so it neither passes nor "
                   "fails it. Validate it with the format's own tools (<code>--strict</code> treats this as a "
                   "failure).</p>")
    out.append("</div><h2>Where quantization is</h2>")
    out.append(_legend(report.modules))
    out.append(_grid(report.modules))
    counts = report.counts()
    out.append(f"<h2>Findings ({counts['error']} error, {counts['warning']} warning, {counts['info']} info)</h2>")
    if report.findings:
        out.append("<table><tr><th>severity</th><th>code</th><th>finding</th><th>engines</th></tr>")
        for f in report.findings:
            mods = "\n".join(module_lines(f, limit=40))
            body = [f"<div>{_e(f.message)}</div>"]
            if f.modules:
                body.append(f'<pre class="mods">{_e(mods)}</pre>')
            if f.predicted_error:
                body.append(f'<div class="eng">engine: <code>{_e(f.predicted_error)}</code></div>')
            if f.fix:
                body.append(f'<div class="fix">fix: {_e(f.fix)}</div>')
            sev = f.severity.value if isinstance(f.severity, Severity) else str(f.severity)
            out.append(f'<tr><td><span class="sev {sev}">{sev}</span></td><td><code>{_e(f.code)}</code><br>'
                       f"<small>{_e(rule_name(f.code))}</small></td><td>{''.join(body)}</td>"
                       f"<td>{_e(', '.join(f.engines))}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No findings.</p>")
    out.append("<h2>Modules by kind</h2><table><tr><th>kind</th>" +
               "".join(f"<th>{_e(st)}</th>" for st in SUMMARY_STATES) + "</tr>")
    for kind, row in s["by_kind"].items():
        out.append(f"<tr><td>{_e(kind)}</td>" + "".join(f'<td class="num">{row.get(st, 0):,}</td>'
                                                       for st in SUMMARY_STATES) + "</tr>")
    out.append("</table></body></html>\n")
    return "\n".join(out)
