"""``autocompress report``: report.md and a self-contained report.html for a finished study.

Both hold the same content: the front as a table (quality, predicted latency / memory / energy,
% of the roofline floor, measured latency where an export measured it), the Pareto plot (PNG; the
HTML adds the interactive plotly version with plotly.js inlined), baselines and screened-out
trials, the fidelity agreement between rungs, measured-vs-predicted latency when the study has
``verify.json`` or ``exports.json`` files, per-layer heatmaps of every front point and the exact
commands that reproduce each point. report.md links the PNGs in ``figures/``; report.html embeds
them, so it can be mailed on its own.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocompress._io import atomic_write_text
from autocompress.report import figures

if TYPE_CHECKING:
    from autocompress.export.study import StudyView
    from autocompress.search.result import Candidate

FRONT_HEADERS = [
    "trial",
    "kind",
    "KL",
    "top-1",
    "ppl",
    "latency ms",
    "memory MB",
    "energy mJ",
    "roofline %",
    "measured ms",
    "plan",
]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def roofline_pct(cost: dict[str, Any]) -> float | None:
    """Give how close the predicted latency is to the roofline floor (100 = at the physical limit)."""
    floor, lat = cost.get("decode_floor_ms"), cost.get("latency_ms")
    return 100.0 * floor / lat if floor and lat else None


def measurement_records(view: StudyView, extra: list[Path] | None = None) -> list[dict[str, Any]]:
    """Give the export/verify records stored with the study (newest per trial wins)."""
    files = [view.dir / "verify.json", *sorted(view.dir.glob("**/exports.json")), *(extra or [])]
    by_trial: dict[int, dict[str, Any]] = {}
    for f in files:
        f = Path(f)
        if f.is_dir():
            f = f / "exports.json"
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for r in data.get("exports", []):
            if "latency" in r and data.get("study") == view.name:
                by_trial[r["trial"]] = r
    return [by_trial[t] for t in sorted(by_trial)]


def _row(c: Candidate, measured: dict[int, dict[str, Any]]) -> list[str]:
    m = measured.get(c.trial, {}).get("latency", {})
    return [
        str(c.trial),
        c.kind,
        _fmt(c.metrics.get("kl")),
        _fmt(c.metrics.get("top1_agreement")),
        _fmt(c.metrics.get("ppl"), 4),
        _fmt(c.cost.get("latency_ms")),
        _fmt(c.cost.get("memory_mb"), 4),
        _fmt(c.cost.get("energy_mj")),
        _fmt(roofline_pct(c.cost), 3),
        _fmt(m.get("measured_decode_ms")),
        c.description or "uncompressed",
    ]


class _Doc:
    """Collects the report once and renders it as markdown and as HTML."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md += [f"{'#' * level} {text}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]) -> None:
        self.md += [f"- {i}" for i in items] + [""]
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def code(self, lines: list[str]) -> None:
        self.md += ["```sh", *lines, "```", ""]
        self.html.append(f"<pre><code>{html.escape(chr(10).join(lines))}</code></pre>")

    def image(self, path: Path | None, alt: str) -> None:
        if path is None:
            return
        rel = path.relative_to(self.out)
        self.md += [f"![{alt}]({rel.as_posix()})", ""]
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def raw_html(self, fragment: str) -> None:
        self.html.append(fragment)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img.fig{max-width:100%;display:block;margin:.5em 0 1.5em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:12px}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd}"""


# marks the page with how many figures decoded (checked by the headless-browser test)
LOADED_JS = (
    "<script>window.addEventListener('load',function(){var i=Array.from(document.images);"
    "document.body.setAttribute('data-images-loaded',i.filter(function(x){return x.complete&&x.naturalWidth>0})"
    ".length+'/'+i.length)});</script>"
)


def _base_cost(view: StudyView) -> dict[str, Any] | None:
    from autocompress.errors import ProfileError
    from autocompress.hardware import CostModel, load_profile
    from autocompress.plan import ModelRef, Plan

    try:
        prof = load_profile(view.profile)
    except ProfileError:
        return None
    cm = CostModel(prof, view.anatomy, **(view.settings.get("scenario") or {}))
    return cm.predict(Plan(model=ModelRef.of(view.anatomy))).to_dict()


def write_report(view: StudyView, out: str | Path, exports: list[Path] | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` for the study into ``out``; give the two reports."""
    from autocompress.export.verify import TABLE_HEADERS, latency_row, reproduce_commands
    from autocompress.search.report import agreement_lines

    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    doc = _Doc(out)
    records = measurement_records(view, exports)
    measured = {r["trial"]: r for r in records}
    s = view.settings
    screened = figures.screened_out(view)
    states = [t.state.name for t in view.trials]
    base = view.user_attrs.get("base_full") or {}
    bcost = _base_cost(view) or {}

    doc.md += [f"# Compression report: study `{view.name}`", ""]
    doc.html.append(f"<h1>Compression report: study <code>{html.escape(view.name)}</code></h1>")
    budgets = ", ".join(f"{k} ≤ {v:g}" for k, v in (s.get("budgets") or {}).items()) or "none"
    doc.bullets(
        [
            f"model: {view.anatomy.name} ({view.anatomy.architecture}, {view.anatomy.num_blocks} blocks)",
            f"hardware profile: {view.profile} (latency = predicted decode ms/token; memory = weights + KV cache "
            "+ activations + runtime)"
            + (
                f"; every KL measured with the runtime's activation rounding emulated ({s['numerics']})"
                if s.get("numerics", "exact") != "exact"
                else ""
            ),
            f"budgets: {budgets}",
            f"trials: {states.count('COMPLETE')} evaluated, {len(screened)} screened out by the cost model, "
            f"{states.count('FAIL')} failed",
            f"uncompressed: ppl {_fmt(base.get('ppl'), 4)}, latency {_fmt(bcost.get('latency_ms'))} ms, "
            f"memory {_fmt(bcost.get('memory_mb'), 4)} MB, energy {_fmt(bcost.get('energy_mj'))} mJ, "
            f"roofline {_fmt(roofline_pct(bcost))} %",
        ]
    )
    doc.heading(f"Pareto front ({len(view.front)} points)")
    doc.para(
        "KL = mean KL divergence to the base model's next-token distribution on held-out text (nats/token); "
        "ppl = held-out perplexity (front points and baselines); roofline % = the roofline floor (same bytes and "
        "flops at datasheet peaks) as a share of the predicted latency (100 = at the physical limit); measured ms "
        "= onnxruntime decode latency on the exporting machine, where an export or search --verify measured it."
    )
    doc.table(FRONT_HEADERS, [_row(c, measured) for c in view.front])
    doc.image(figures.pareto_png(view, figs / "pareto.png"), "Pareto front")
    doc.raw_html("<h3>Interactive</h3>" + figures.pareto_plotly(view))
    doc.heading("Uniform baselines")
    doc.table(FRONT_HEADERS, [_row(c, measured) for c in view.baselines.values()])
    if screened:
        doc.heading(f"Screened out by the cost model ({len(screened)} trials, never evaluated)")
        rows = [[str(n), _fmt(c.get("latency_ms")), _fmt(c.get("memory_mb"), 4), why] for n, c, why in screened[:30]]
        doc.table(["trial", "latency ms", "memory MB", "budget broken"], rows)
    doc.heading("Fidelity agreement (is the cheap proxy ranking plans like the expensive metric?)")
    doc.bullets(
        [line.replace("**", "").removeprefix("- ") for line in agreement_lines(view.user_attrs.get("agreement") or {})]
    )
    doc.image(figures.agreement_png(view, figs / "agreement.png"), "rung agreement")
    doc.heading("Cost model: measured vs predicted latency on this machine")
    if records:
        doc.para(
            "Exported to ONNX (quantized as the plan says), measured with onnxruntime CPU (warm-up, median of "
            "repeats, fixed threads) and compared with the local profile's prediction for the same scenario."
        )
        doc.table(TABLE_HEADERS, [latency_row(r) for r in records])
        doc.image(figures.measured_png(records, figs / "measured.png"), "measured vs predicted latency")
    else:
        doc.para(
            f"No measurements stored with this study yet: run `autocompress export --study {view.name} --pareto "
            f"--out {view.dir / 'exports'} --studies {view.dir.parent}` (or `search --verify K`) and report again."
        )
    doc.heading("Per-layer choices of each front point")
    doc.para(
        "Grey rows: dropped blocks. Left labels: kept attention heads (h) / MLP channels where a block was narrowed."
    )
    for c in view.front:
        doc.image(figures.heatmap_png(view, c, figs / f"layers-{c.trial}.png"), f"per-layer choices of trial {c.trial}")
    doc.heading("Reproduce")
    if view.front:
        first = reproduce_commands(view, view.front[0])
        doc.para("The study (same settings, seed and data give the same plans and weights):")
        doc.code([first[0]])
        for c in view.front:
            doc.para(f"Trial {c.trial} ({c.description or 'uncompressed'}):")
            doc.code(reproduce_commands(view, c)[1:])
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, "\n".join(doc.md))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>autocompress report: '
        f"{html.escape(view.name)}</title><style>{CSS}</style></head><body>{''.join(doc.html)}{LOADED_JS}</body></html>"
    )
    atomic_write_text(html_path, page)
    return [md_path, html_path]
