"""Tables of the results: one row per cell (utility and privacy side by side), the defense x attack matrix
in Markdown, LaTeX (booktabs) and HTML with the best defense per column marked, and the compact summary that
``leakbench run`` prints. Every table shows the current rows only (``evaluation.store.current_rows``)."""
from __future__ import annotations

import json

import pandas as pd

from leakbench import defenses

from leakbench.evaluation.metrics import IMAGE_METRICS
from leakbench.evaluation.store import current_rows, params_text
from leakbench.evaluation.strongest import STRONGEST


def format_params(text: str) -> str:
    """JSON parameters as ``k=v, ...`` (empty for none)."""
    return params_text(json.loads(text) if text else {})


def _guarantee(text: str | None) -> str:
    """A defense's formal guarantee in one cell, e.g. ``ε=1, δ=1e-05``; empty when it has none."""
    g = json.loads(text) if text else {}
    parts = []
    if "epsilon" in g:
        parts.append(f"ε={g['epsilon']:.4g}")
    if g.get("delta"):
        parts.append(f"δ={g['delta']:.3g}")
    return ", ".join(parts)


def _ci_text(low: float | None, high: float | None, fmt: str) -> str:
    """``[low, high]``, or ``no CI`` when the store has none (too few images for the bootstrap, or undefined)."""
    return f"[{low:{fmt}}, {high:{fmt}}]" if pd.notna(low) and pd.notna(high) else "no CI"


def result_table(cells: pd.DataFrame) -> pd.DataFrame:
    """A readable frame of the cells: identity, status, accuracy, guarantee, and each privacy metric with its
    95% CI."""
    rows = []
    for _, c in current_rows(cells).iterrows():
        row = {"cut": c["cut"], "defense": c["defense"], "defense params": format_params(c["defense_params"]),
               "attack": c["attack"], "seed": c["seed"], "status": c["status"],
               "accuracy": c.get("accuracy"), "guarantee": _guarantee(c.get("guarantee_json"))}
        for metric in IMAGE_METRICS:
            if metric in c and pd.notna(c[metric]):
                row[metric] = c[metric]
                row[f"{metric} 95% CI"] = _ci_text(c.get(f"{metric}_ci_low"), c.get(f"{metric}_ci_high"), ".4g")
            else:
                row[metric] = None
        row["time (s)"] = c.get("wall_time_s")
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(cells: pd.DataFrame) -> str:
    """The result table as GitHub Markdown; failed and inapplicable cells keep their rows."""
    table = result_table(cells)
    return table.to_markdown(index=False, floatfmt=".4g")


# -- the defense x attack matrix -----------------------------------------------------------------------

#: The metrics shown per attack in the matrix table, with their column titles.
MATRIX_METRICS: dict[str, str] = {"psnr": "PSNR (dB)", "attack_top1": "attack top-1"}
#: A defense competes for "best" only if its accuracy is at most this far below the undefended model's.
ACCURACY_TOLERANCE = 0.05
#: What else tells rows apart when a store holds several of it (each group has its own undefended reference).
ROW_GROUPS = ("dataset", "model", "cut", "seed")


def is_baseline(name: str) -> bool:
    """Whether the defense registered as ``name`` declares itself an undefended reference row (``baseline``):
    it is the accuracy reference and never marked best. A name this code does not register is not one."""
    return name in defenses.names() and defenses.defense_class(name).baseline


def distinguishing_params(cells: pd.DataFrame, name: str, params: str) -> pd.Series:
    """Per row, ``k=v, ...`` of only those parameters whose values differ between the rows of the same ``name``
    (a defense's strength, an attack's variant); empty when the frame holds one parameter set of the name."""
    parsed = cells[params].map(lambda text: json.loads(text) if text else {})
    varying: dict[str, list[str]] = {}
    for value, group in parsed.groupby(cells[name], sort=False):
        keys = list(dict.fromkeys(k for p in group for k in p))
        varying[value] = [k for k in keys if len({json.dumps(p.get(k)) for p in group}) > 1]
    return pd.Series([params_text({k: p.get(k) for k in varying[n]}) for n, p in zip(cells[name], parsed)],
                     index=cells.index)


def variant_labels(cells: pd.DataFrame, name: str, params: str) -> pd.Series:
    """Per row, the ``name`` column's value, with the parameters that tell its variants apart when the frame
    holds several sets of them, e.g. ``peel(solver=paper, refine=False)``."""
    which = distinguishing_params(cells, name, params)
    return pd.Series([f"{n}({w})" if w else n for n, w in zip(cells[name], which)], index=cells.index)


def strength_labels(cells: pd.DataFrame) -> pd.Series:
    """A defense's strength: the parameters that differ between its rows, or all of them when it has one row."""
    which = distinguishing_params(cells, "defense", "defense_params")
    return pd.Series([w or format_params(p) for w, p in zip(which, cells["defense_params"])], index=cells.index)


def matrix_table(cells: pd.DataFrame, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per defense (and strength; per dataset, model, cut and seed when there are several), its accuracy
    and guarantee, then per attack the mean of each metric (NaN when the cell is not done or the store lacks
    the metric).

    ``attrs["status"]`` maps (row, column) to ``failed`` / ``not_applicable`` for cells without a value."""
    metrics = metrics or MATRIX_METRICS
    cells = current_rows(cells).copy()
    cells["attack_label"] = variant_labels(cells, "attack", "attack_params")
    keys = [k for k in ROW_GROUPS if k in cells and cells[k].nunique() > 1] + ["defense", "strength"]
    cells["strength"] = strength_labels(cells)
    rows: dict[tuple, dict] = {}
    status: dict[tuple[int, str], str] = {}
    for _, c in cells.iterrows():
        key = tuple(c[k] for k in keys)
        row = rows.setdefault(key, {**dict(zip(keys, key)), "accuracy": None, "guarantee": ""})
        if pd.notna(c.get("accuracy")):
            row["accuracy"] = c["accuracy"]
        row["guarantee"] = row["guarantee"] or _guarantee(c.get("guarantee_json"))
        for metric, title in metrics.items():
            column = f"{c['attack_label']}: {title}"
            value = c[metric] if metric in c and c["status"] == "done" else None
            row[column] = value if pd.notna(value) else None
            if c["status"] != "done":
                status[(list(rows).index(key), column)] = c["status"]
    table = pd.DataFrame(list(rows.values()))
    table.attrs["status"] = status
    table.attrs["metrics"] = {f"{label}: {title}": metric for label in cells["attack_label"].unique()
                              for metric, title in metrics.items()}
    return table


def best_rows(table: pd.DataFrame, tolerance: float = ACCURACY_TOLERANCE) -> dict[str, list[int]]:
    """Per metric column of ``matrix_table``, the rows of the best defenses, one per dataset/model/cut/seed group (one
    in all when the table has a single group): the least leakage (direction from ``IMAGE_METRICS``) among the
    group's defended rows whose accuracy is within ``tolerance`` of its undefended row's (any accuracy when
    the group has no undefended row). A group without a qualifying row has no entry."""
    keys = [k for k in ROW_GROUPS if k in table]
    groups = [group.index for _, group in table.groupby(keys, sort=False)] if keys else [table.index]
    best: dict[str, list[int]] = {}
    for column, metric in table.attrs.get("metrics", {}).items():
        for rows in groups:
            group = table.loc[rows]
            undefended = group["defense"].map(is_baseline).astype(bool)
            reference = group.loc[undefended, "accuracy"].dropna()
            candidates = group[~undefended & group[column].notna()]
            if not reference.empty:
                candidates = candidates[candidates["accuracy"] >= reference.max() - tolerance]
            if not candidates.empty:
                values = candidates[column].astype(float)
                best.setdefault(column, []).append(  # least leakage
                    int(values.idxmin() if IMAGE_METRICS[metric] else values.idxmax()))
    return best


def best_caption(tolerance: float = ACCURACY_TOLERANCE) -> str:
    """What the marked entries mean, for captions."""
    return (f"Marked: per column (and dataset, model, cut and seed, when there are several), the defense that "
            f"leaks least (lowest PSNR, lowest attack accuracy) among those whose accuracy is within "
            f"{tolerance * 100:g} percentage points of the undefended model's. The strongest columns take, per "
            f"image, the most leakage any attack reached: the best defense is the one marked there. "
            f"n/a: the attack does not apply; failed: the cell failed (see the report); "
            f"--: metric not in the store.")


def missing_text(status: str | None) -> str:
    """What a matrix entry without a value shows: why the cell has none, or ``--`` (metric not in the store)."""
    texts: dict[str | None, str] = {"failed": "failed", "not_applicable": "n/a"}
    return texts.get(status, "--")


def _display(table: pd.DataFrame, bold) -> pd.DataFrame:
    """Strings for every entry: numbers rounded, missing values by status, best entries through ``bold``."""
    best = best_rows(table)
    shown = table.copy().astype(object)
    for column in table.columns:
        for index, value in table[column].items():
            if column in table.attrs["metrics"]:
                state = table.attrs["status"].get((index, column))
                text = missing_text(state) if pd.isna(value) \
                    else f"{value:.3g}" if table.attrs["metrics"][column] != "psnr" else f"{value:.1f}"
                shown.at[index, column] = bold(text) if index in best.get(column, []) else text
            elif column == "accuracy":
                shown.at[index, column] = "--" if pd.isna(value) else f"{value:.3f}"
            else:
                shown.at[index, column] = "" if value is None or (isinstance(value, float) and pd.isna(value)) \
                    else str(value)
    return shown


def matrix_markdown(cells: pd.DataFrame) -> str:
    """The defense x attack matrix as GitHub Markdown, best defense per column in bold, with its caption."""
    shown = _display(matrix_table(cells), lambda text: f"**{text}**")
    return shown.to_markdown(index=False) + "\n\n" + best_caption()


def matrix_styler(cells: pd.DataFrame, escape: str = "latex") -> "pd.io.formats.style.Styler":
    """The matrix as a pandas Styler, entries escaped for ``escape`` (``latex`` or ``html``), the best defense per
    column in bold (CSS, converted for LaTeX)."""
    table = matrix_table(cells)
    shown = _display(table, lambda text: text)
    styler = shown.style.hide(axis="index").format(escape=escape).format_index(escape=escape, axis=1)
    for column, indices in best_rows(table).items():
        styler = styler.map(lambda _: "font-weight: bold;", subset=pd.IndexSlice[indices, [column]])
    return styler


def matrix_latex(cells: pd.DataFrame, caption: str | None = None, label: str = "tab:leakage") -> str:
    """The defense x attack matrix as a LaTeX booktabs table (needs ``\\usepackage{booktabs}``), best defense
    per column in bold, special characters escaped."""
    styler = matrix_styler(cells, "latex")
    return styler.to_latex(hrules=True, caption=caption or best_caption(), label=label, convert_css=True,
                           position_float="centering",  # text columns left, numbers right
                           column_format="".join("l" if c in (*ROW_GROUPS, "defense", "strength", "guarantee")
                                                 else "r" for c in styler.data.columns))


def matrix_html(cells: pd.DataFrame) -> str:
    """The defense x attack matrix as an HTML table (for the report), best defense per column in bold."""
    return matrix_styler(cells, "html").set_table_attributes('class="matrix"').to_html()


# -- the compact summary of `leakbench run` -----------------------------------------------------------------

#: The widest line the compact summary prints (a terminal's width; the full table is in table.md).
SUMMARY_WIDTH = 100
#: The summary's column of the strongest-attacker rows (``evaluation.strongest``).
PER_IMAGE_BEST = "best/img"
#: The longest defense label in the summary, and the longest attack name used as a column title (longer
#: attack names become letters with a legend).
SUMMARY_LABEL, SUMMARY_ATTACK = 32, 18


def _psnr_text(cell: pd.Series) -> str:
    """``23.4 [22.1, 24.6]`` (mean and 95% CI), or why a cell has no PSNR."""
    if cell["status"] != "done":
        return missing_text(cell["status"])
    if pd.isna(cell.get("psnr")):
        return "--"
    return f"{cell['psnr']:.1f} {_ci_text(cell.get('psnr_ci_low'), cell.get('psnr_ci_high'), '.1f')}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _layout(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows of strings as aligned columns two spaces apart, the columns in ``right`` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(t.rjust(w) if i in right else t.ljust(w) for i, (t, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _chunks(rows: list[list[str]], first: int, width: int) -> list[list[int]]:
    """The attack columns (indices from ``first`` on) in blocks whose lines fit ``width``: the first block
    after all leading columns, the others after the defense column only."""
    span = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    chunks: list[list[int]] = [[]]
    used = sum(span[:first]) + 2 * (first - 1)
    for i in range(first, len(span)):
        if chunks[-1] and used + 2 + span[i] > width:
            chunks.append([])
            used = span[0]
        chunks[-1].append(i)
        used += 2 + span[i]
    return chunks


def _strongest(line: dict, names: dict[str, str]) -> str:
    """The summary's ``strongest`` entry: the attack that won the most images, else the highest mean PSNR."""
    if line["winner"] is not None:  # a variant label, as the summary's columns
        return names.get(line["winner"], line["winner"])
    return names[max(line["psnr"], key=line["psnr"].get)] if line["psnr"] else "--"


def compact_summary(cells: pd.DataFrame, width: int = SUMMARY_WIDTH) -> str:
    """One line per defense (and strength; under a heading per dataset, model, cut and seed when there are
    several): its accuracy, the strongest attack (highest mean PSNR) and each attack's PSNR with its 95% CI,
    in lines of at most ``width`` characters. Long attack names become letters with a legend; attacks that do
    not fit on one line continue in a further block."""
    cells = current_rows(cells)
    if cells.empty:
        return "no current cells"
    cells = cells.assign(attack_label=variant_labels(cells, "attack", "attack_params"),
                         strength=strength_labels(cells))
    attacks = [a for a in dict.fromkeys(cells["attack_label"]) if a != STRONGEST] + (
        [STRONGEST] if (cells["attack_label"] == STRONGEST).any() else [])  # the per-image best comes last
    letters = any(len(a) > SUMMARY_ATTACK for a in attacks if a != STRONGEST)
    names = {a: (chr(ord("A") + i) if i < 26 else f"Z{i}") if letters else a for i, a in enumerate(attacks)}
    names[STRONGEST] = PER_IMAGE_BEST
    groups = [k for k in ROW_GROUPS if k in cells and cells[k].nunique() > 1]
    lines: dict[tuple, dict] = {}
    for _, c in cells.iterrows():
        line = lines.setdefault(tuple(c[k] for k in groups) + (c["defense"], c["strength"]),
                                {"psnr": {}, "text": {}, "accuracy": None, "winner": None})
        line["text"][c["attack_label"]] = _psnr_text(c)
        if c["attack_label"] == STRONGEST:
            winner = c.get("strongest_winner")
            line["winner"] = winner if isinstance(winner, str) else None
        elif c["status"] == "done" and pd.notna(c.get("psnr")):
            line["psnr"][c["attack_label"]] = float(c["psnr"])
        if pd.notna(c.get("accuracy")):
            line["accuracy"] = float(c["accuracy"])
    keys = list(lines)
    rows = [["defense", "acc", "strongest"] + [names[a] for a in attacks]] + [
        [_clip(f"{k[-2]} {k[-1]}".strip(), SUMMARY_LABEL),
         "--" if v["accuracy"] is None else f"{v['accuracy']:.3f}",
         _strongest(v, names)] + [v["text"].get(a, "--") for a in attacks]
        for k, v in lines.items()]
    per_image = STRONGEST in attacks
    text = ["acc: the defended model's top-1 accuracy; strongest: the attack "
            + ("that won the most images on PSNR" if per_image else "with the highest mean PSNR"),
            "per attack: PSNR (dB), mean [95% CI] (no CI: too few images"
            + (f"); {PER_IMAGE_BEST}: per image, the best attack" if per_image else " for the bootstrap)")]
    for n, chunk in enumerate(_chunks(rows, 3, width)):
        columns = ([0, 1, 2] if n == 0 else [0]) + chunk
        table = _layout([[r[i] for i in columns] for r in rows], {j for j, i in enumerate(columns) if i == 1 or i >= 3})
        text += ([""] if n else []) + table[:1]
        for i, row in enumerate(table[1:]):
            if groups and (i == 0 or keys[i][:-2] != keys[i - 1][:-2]):
                text.append(" | ".join(str(v) for v in keys[i][:-2]) + ":")
            text.append(row)
    text += [f"{names[a]} = {a}" for a in attacks] if letters else []
    return "\n".join(_clip(line, width) for line in text)
