"""``leakbench report RESULTS_DIR``: one self-contained HTML page (figures embedded as data URIs, no external
resources) with the tables, the figures, each cell's status and each run's provenance, written beside the
store with ``table.tex`` and the figures as PNG and PDF. It opens the store read-only and shows its current rows
(those the installed code would compute again the same), saying how many stale ones it holds."""
from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from leakbench.evaluation.config import Cell
from leakbench.evaluation.eval_classifier import CLASSIFIER_METRICS
from leakbench.evaluation.export import find_store
from leakbench.evaluation.metrics import IMAGE_METRICS
from leakbench.evaluation.outputs import reconstruction_grids, write_figures, write_text
from leakbench.evaluation.perceptual import LPIPS_UNAVAILABLE
from leakbench.evaluation.store import ResultStore, current_rows, stale_line
from leakbench.evaluation.strongest import with_strongest
from leakbench.evaluation.tables import best_caption, matrix_html, matrix_latex, result_table
from leakbench.splitnn.faults import writing

#: Title and one-line description of each figure, in report order.
FIGURE_TEXT = {
    "privacy_utility_psnr": ("Privacy-utility: accuracy against PSNR",
                             "One line per defense over its strengths; error bars: bootstrap 95% CI of the PSNR."),
    "privacy_utility_attack_top1": ("Privacy-utility: accuracy against attack accuracy",
                                    "Attack accuracy: the evaluation classifier's top-1 on the reconstructions; "
                                    "error bars: bootstrap 95% CI."),
    "heatmap_psnr": ("Defense × attack matrix (PSNR)", "Red: more leakage; grey: failed or not applicable."),
    "peel_depth": ("PEEL along the depth of the client",
                   "Relative error of each block's recovered input, from the input side to the cut."),
    "leakage_by_depth": ("Leakage and accuracy against the depth of the cut",
                         "Per defense: PSNR against the strongest attacker (per image, the best any attack reached) "
                         "and the defended model's accuracy at each cut."),
    "reconstructions": ("Reconstructions", "Originals (first row) over each done cell's reconstructions."),
}

_TEMPLATE = jinja2.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>leakbench report: {{ name }}</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
.status-done { color: #176417; } .status-failed { color: #b00020; } .status-not_applicable { color: #8a6d00; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; }
</style></head><body>
<h1>leakbench report: {{ name }}</h1>
<p class="note">Store: {{ store }} · {{ counts }} · written {{ written }}</p>
<p id="stale">{{ stale }}</p>

<h2 id="matrix">Defense × attack matrix</h2>
{{ matrix | safe }}
<p class="note">{{ caption }}</p>
{% if unavailable %}<h3>Metrics not available</h3><ul>
{% for metric, why in unavailable.items() %}<li><b>{{ metric }}</b>: {{ why }}</li>{% endfor %}</ul>{% endif %}

<h2 id="figures">Figures</h2>
{% for f in figures %}<figure><figcaption><b>{{ f.title }}</b>: {{ f.text }}</figcaption>
<img src="data:image/png;base64,{{ f.data }}" alt="{{ f.title }}"></figure>
{% else %}<p>No figure: no cell is done.</p>{% endfor %}
{% for why in missing_figures %}<p class="note">{{ why }}</p>{% endfor %}

<h2 id="cells">Cells</h2>
<table><thead><tr><th>cell</th><th>status</th><th>reason</th><th>time (s)</th></tr></thead><tbody>
{% for c in cells %}<tr><td>{{ c.label }}</td><td class="status-{{ c.status }}">{{ c.status_text }}</td>
<td>{% if c.reason %}{{ c.reason_head }}{% if c.reason_more %}<details><summary>details</summary>
<pre>{{ c.reason }}</pre></details>{% endif %}{% endif %}</td><td>{{ c.time }}</td></tr>
{% endfor %}</tbody></table>

<h2 id="results">All results</h2>
{{ results | safe }}

<h2 id="provenance">Provenance</h2>
{% for r in runs %}<h3>run {{ r.run_id }}</h3><table>
{% for k, v in r.fields %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<details><summary>config</summary><pre>{{ r.config }}</pre></details>
{% endfor %}
</body></html>
""", autoescape=True)

STATUS_TEXT = {"done": "done", "failed": "failed", "not_applicable": "not applicable"}


def _utc(timestamp: float | None) -> str:
    if timestamp is None or pd.isna(timestamp):
        return "did not finish (killed or still running)"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def unavailable_metrics(cells: pd.DataFrame) -> dict[str, str]:
    """Each per-image metric that no done cell has, with the reason (from the cells' diagnostics when they
    recorded one)."""
    done = cells[cells["status"] == "done"]
    notes: dict[str, str] = {}
    for text in done["diagnostics_json"]:
        notes.update(json.loads(text or "{}").get("evaluation", {}).get("unavailable", {}))
    missing = {}
    for metric in IMAGE_METRICS:
        if metric in done and done[metric].notna().any():
            continue
        if metric == "lpips":
            missing[metric] = notes.get("lpips", LPIPS_UNAVAILABLE)
        elif metric in CLASSIFIER_METRICS:
            missing[metric] = ("evaluation.classifier is false" if "attack_top1" in notes else
                               "not in this store: it was written before leakbench computed the evaluation "
                               "classifier's metrics (rerun into a new directory to get them)")
        else:
            missing[metric] = "no done cell has it"
    return missing if not done.empty else {}


def _cell_rows(cells: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for _, c in cells.iterrows():
        reason = c["reason"] if isinstance(c["reason"], str) else ""  # NULL reads back as NaN
        head = reason.strip().splitlines()[0] if reason.strip() else ""
        rows.append({"label": Cell(json.loads(c["config_json"])).label(), "status": c["status"],
                     "status_text": STATUS_TEXT.get(c["status"], c["status"]), "reason": reason,
                     "reason_head": head, "reason_more": reason.strip() != head,
                     "time": "" if pd.isna(c["wall_time_s"]) else f"{c['wall_time_s']:.1f}"})
    return rows


def _run_rows(runs: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for _, r in runs.iterrows():
        prov = json.loads(r["provenance_json"] or "{}")
        versions = ", ".join(f"{k} {v}" for k, v in sorted((prov.get("versions") or {}).items()) if v)
        fields = [("started", _utc(r["started_at"])), ("finished", _utc(r["finished_at"])),
                  ("git commit", prov.get("git_commit") or "unknown"), ("python", prov.get("python", "")),
                  ("platform", prov.get("platform", "")), ("device", prov.get("device", "")),
                  ("torch threads", prov.get("torch_threads", "")), ("executor", prov.get("executor", "")),
                  ("packages", versions)]
        config = json.dumps(json.loads(r["config_json"] or "null"), indent=2)
        rows.append({"run_id": r["run_id"], "fields": fields, "config": config})
    return rows


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figure_order(made: dict[str, list[Path]]) -> list[str]:
    """FIGURE_TEXT's order, the reconstruction grids (one per dataset) last."""
    grids = [name for name in made if name.startswith("reconstructions")]
    return [name for name in FIGURE_TEXT if name in made and name not in grids] + grids


def _figure(name: str, path: Path) -> dict[str, str]:
    """Title, description and the PNG as base64 of one figure; per-dataset grids are named by dataset."""
    title, text = FIGURE_TEXT.get(name, FIGURE_TEXT["reconstructions"])
    if name != "reconstructions" and name.startswith("reconstructions"):
        title += f" ({name.split('_', 2)[2]})"
    return {"title": title, "text": text, "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def write_report(results: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``table.tex`` and the figures (PNG and PDF) into the directory of the store at
    ``results`` (a results directory or its ``results.sqlite``); returns what it wrote, by name."""
    db = find_store(results)
    out = db.parent
    with ResultStore(db, read_only=True) as store:
        everything, runs = store.cells(), store.runs()
        if everything.empty:
            raise RuntimeError(f"{db} has no cells yet: run `leakbench run` first")
        cells, stale = current_rows(everything), stale_line(everything)
        if cells.empty:
            raise RuntimeError(f"{db} has no current cells: all {len(everything)} were computed by other code or "
                               f"package versions; rerun `leakbench run` on their config to recompute them")
        grids = reconstruction_grids(store, cells)
        # tables and figures add the strongest-attacker rows (after the grids: such a row has no images)
        shown = with_strongest(cells, store.images())
    with writing(out):
        made = write_figures(shown, out, grids)
    write_text(out / "table.tex", matrix_latex(shown) + "\n")

    missing = [f"No reconstruction grid for {g.dataset}: {g.problem}." for g in grids if g.problem]
    for name in ("privacy_utility_attack_top1", "peel_depth"):
        if name not in made:
            missing.append(f"No figure “{FIGURE_TEXT[name][0]}”: "
                           + ("no done cell has attack accuracy." if name != "peel_depth" else
                              "no done PEEL cell recorded per-block errors."))
    counts = cells["status"].value_counts()
    html = _TEMPLATE.render(
        name=", ".join(dict.fromkeys(json.loads(c or "{}").get("name", "") for c in runs["config_json"])) or out.name,
        store=str(db), written=_utc(datetime.datetime.now(datetime.timezone.utc).timestamp()),
        counts=", ".join(f"{n} {STATUS_TEXT.get(s, s)}" for s, n in counts.items()), stale=stale,
        matrix=matrix_html(shown), caption=best_caption(), unavailable=unavailable_metrics(cells),
        figures=[_figure(name, made[name][0]) for name in _figure_order(made)],
        missing_figures=missing, cells=_cell_rows(cells),
        results=result_table(shown).style.hide(axis="index").format(_number, na_rep="", escape="html").to_html(),
        runs=_run_rows(runs))
    write_text(out / "report.html", html)
    paths = {"report": out / "report.html", "latex table": out / "table.tex"}
    paths.update({f"figure {name}": found[0] for name, found in made.items()})
    return paths
