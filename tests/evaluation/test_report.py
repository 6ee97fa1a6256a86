"""Tables, figures and the HTML report: hand-made frames, and a tiny run (harness.FOUR_CELLS) with a done, a
failed and two not-applicable cells."""
import json
import re
import shutil

import pandas as pd
import pytest

from harness import FOUR_CELLS, swap, write_config
from leakbench import attacks
from leakbench.evaluation import figures
from leakbench.evaluation.cli import main
from leakbench.evaluation.tables import best_rows, matrix_latex, matrix_markdown, matrix_table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def _cell(defense, params, attack, accuracy, psnr, top1, status="done", reason=None, stages=None):
    diagnostics = {"attack": {"stages": [{"stage": f"b{i}"} for i in range(len(stages))],
                              "true_input_errors": list(stages)}} if stages else {}
    row = {"cell_key": f"{defense}{params}{attack}", "status": status, "reason": reason, "cut": "layer1",
           "seed": 0, "defense": defense, "defense_params": json.dumps(params), "attack": attack,
           "attack_params": "{}", "accuracy": accuracy, "guarantee_json": "{}",
           "diagnostics_json": json.dumps(diagnostics)}
    for metric, value in (("psnr", psnr), ("attack_top1", top1)):
        row.update({metric: value, f"{metric}_ci_low": None if value is None else value - 1,
                    f"{metric}_ci_high": None if value is None else value + 1})
    return row


@pytest.fixture
def frame():
    """Hand-made cells: the strongest noise leaks least but costs 40 points of accuracy."""
    return pd.DataFrame([
        _cell("none", {}, "peel", 0.90, 60.0, 0.9, stages=[0.5, 0.1, 0.01]),
        _cell("gaussian_noise", {"scale": 0.1}, "peel", 0.89, 20.0, 0.6, stages=[0.9, 0.4, 0.2]),
        _cell("gaussian_noise", {"scale": 0.5}, "peel", 0.86, 14.0, 0.7),
        _cell("gaussian_noise", {"scale": 5.0}, "peel", 0.50, 8.0, 0.1),
        _cell("none", {}, "rmle", 0.90, 70.0, 0.95),
        _cell("gaussian_noise", {"scale": 0.1}, "rmle", 0.89, None, None, "failed", "RuntimeError: boom"),
        _cell("gaussian_noise", {"scale": 0.5}, "rmle", 0.86, 15.0, 0.5),
        _cell("gaussian_noise", {"scale": 5.0}, "rmle", None, None, None, "not_applicable", "no inverse"),
    ])


def test_best_defense_is_least_leakage_within_the_accuracy_tolerance(frame):
    table = matrix_table(frame)
    assert list(table["strength"]) == ["", "scale=0.1", "scale=0.5", "scale=5.0"]
    best = best_rows(table)
    assert best["peel: PSNR (dB)"] == [2]  # scale 5.0 leaks less but loses 40 points; 0.5 is within 5
    assert best["peel: attack top-1"] == [1]  # lowest attack accuracy among the rows that keep accuracy
    assert best["rmle: PSNR (dB)"] == [2]
    assert best_rows(table, tolerance=0.5)["peel: PSNR (dB)"] == [3]
    markdown = matrix_markdown(frame)
    assert "**14.0**" in markdown and "**60.0**" not in markdown  # the undefended row is never marked
    assert "| failed" in markdown and "| n/a" in markdown and "within 5 percentage points" in markdown


def test_each_model_is_judged_against_its_own_undefended_row(frame):
    other = frame[frame.attack == "peel"].assign(model="resnet56")
    other.loc[other.defense == "none", "accuracy"] = 0.55  # a weak model: strong noise is within 5 points
    both = pd.concat([frame[frame.attack == "peel"].assign(model="resnet20"), other], ignore_index=True)
    table = matrix_table(both)
    assert list(table["model"]) == ["resnet20"] * 4 + ["resnet56"] * 4
    # resnet20: scale 0.5 (scale 5.0 loses 40 points); resnet56: scale 5.0 is within 5 points of its 0.55
    assert best_rows(table)["peel: PSNR (dB)"] == [2, 7]


def test_latex_table_is_booktabs_escaped_and_well_formed(frame):
    tex = matrix_latex(frame)
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}", "\\end{tabular}", "\\caption{"):
        assert tex.count(rule) == 1
    assert "gaussian\\_noise" in tex and "scale=0.5" in tex
    assert not re.search(r"(?<!\\)_", tex)  # every underscore escaped
    assert tex.count("\\bfseries") == 4  # one best entry per attack column
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    columns = tex.split("\\begin{tabular}{")[1].split("}")[0]
    assert len(body) == 4 and all(line.count("&") == len(columns) - 1 for line in body)


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_valid_png_and_pdf(frame, tmp_path):
    made = [figures.privacy_utility(frame, "psnr", tmp_path / "pu_psnr"),
            figures.privacy_utility(frame, "attack_top1", tmp_path / "pu_top1"),
            figures.leakage_heatmap(frame, tmp_path / "heat"),
            figures.peel_depth_profile(frame, tmp_path / "depth")]
    for png, pdf in made:
        assert _is_png(png) and png.stat().st_size > 5000
        assert pdf.read_bytes()[:5] == b"%PDF-" and b"%%EOF" in pdf.read_bytes()[-64:]
    assert figures.privacy_utility(frame, "lpips", tmp_path / "none") == []  # no data, no figure
    assert figures.peel_depth_profile(frame[frame.attack == "rmle"], tmp_path / "none") == []


def test_infinite_psnr_with_null_cis_goes_through_every_table_and_figure(frame, tmp_path):
    """A perfect reconstruction has PSNR +inf and no CI (the bootstrap of infinite values is undefined)."""
    from leakbench.evaluation.outputs import write_figures
    from leakbench.evaluation.tables import compact_summary, matrix_html, to_markdown

    perfect = frame.copy()
    perfect.loc[perfect.attack == "peel", ["psnr", "psnr_ci_low", "psnr_ci_high"]] = [float("inf"), None, None]
    assert "inf" in to_markdown(perfect) and "no CI" in to_markdown(perfect)
    assert "inf" in matrix_markdown(perfect) and "inf" in matrix_latex(perfect) and "inf" in matrix_html(perfect)
    assert compact_summary(perfect).count("inf no CI") == 4  # the four PEEL cells
    made = write_figures(perfect, tmp_path)
    assert {"privacy_utility_psnr", "heatmap_psnr"} <= set(made)
    assert all(_is_png(paths[0]) for paths in made.values())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run with one done, one failed and two not-applicable cells, then `leakbench report` on it."""
    tmp = tmp_path_factory.mktemp("report")
    # with the classifier (for the attack-top-1 figure); at 16x16 its judge is the session's cheap one
    config = write_config(tmp, swap(FOUR_CELLS, "classifier: false", "classifier: true"), "tiny.yaml")
    original, calls = attacks.RMLE.reconstruct, []

    def fails_under_noise(self, client, features, **ctx):
        calls.append(1)
        if len(calls) > 1:  # the cells run in config order: rMLE against no defense first, then against noise
            raise RuntimeError("solver exploded")
        return original(self, client, features, **ctx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attacks.RMLE, "reconstruct", fails_under_noise)
        patch.setattr(attacks.PEEL, "supports", lambda self, client, defense=None: (False, "no inverse here"))
        assert main(["run", str(config), "--out", str(tmp / "out"), "--quiet"]) == 1  # a cell failed
    ran = sorted(p.name for p in (tmp / "out").iterdir())
    (tmp / "out" / "table.tex").unlink()
    assert main(["report", str(tmp / "out")]) == 0
    return tmp / "out", ran


def test_run_writes_latex_table_and_figures(tiny_run):
    _, ran = tiny_run
    for name in ("table.md", "table.tex", "privacy_utility_psnr.png", "privacy_utility_psnr.pdf",
                 "privacy_utility_attack_top1.png", "heatmap_psnr.pdf", "reconstructions.png"):
        assert name in ran


def test_report_is_self_contained_with_statuses_reasons_and_provenance(tiny_run):
    out, _ = tiny_run
    html = (out / "report.html").read_text()
    assert (out / "table.tex").read_text().count("\\toprule") == 1
    assert "solver exploded" in html and "no inverse here" in html
    assert "not applicable" in html and "failed" in html and "done" in html
    assert "git commit" in html and "torch" in html and "attack top-1" in html
    assert "holds no stale rows" in html
    assert "LPIPS not computed" in html  # the lpips column is unavailable, with the reason
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in html and "<link" not in html


def test_report_on_an_empty_directory_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.sqlite" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium); "
                                             ".ci/run installs it")
def test_report_images_render_in_headless_chromium(tiny_run):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out, _ = tiny_run
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else outside.append(r.url))
            page.goto((out / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        finally:
            browser.close()
    assert len(images) >= 3 and all(done and width > 0 for done, width in images)
    assert outside == []  # nothing fetched from anywhere but the file itself
    assert {"Figures", "Cells", "Provenance"} <= set(headings)


def test_one_reconstruction_grid_per_dataset_and_a_reason_when_one_cannot_load(tiny_config, tmp_path):
    import torch

    from leakbench.evaluation import ResultStore, load_config
    from leakbench.evaluation.outputs import reconstruction_grids, write_figures

    base = load_config(tiny_config).cells()[0].config
    configs = [{**base, "dataset": {"name": "digits", "params": {**base["dataset"]["params"], "size": size}}}
               for size in (16, 8)] + [{**base, "dataset": {"name": "gone", "params": {}}}]
    with ResultStore(tmp_path / "r.sqlite") as store:
        for i, config in enumerate(configs):
            size = config["dataset"]["params"].get("size", 8)
            store.write_cell(f"k{i}", "run", config, "done", accuracy=0.5,
                             reconstruction=torch.rand(2, 3, size, size))
        grids = reconstruction_grids(store, store.cells())
        made = write_figures(store.cells(), tmp_path, grids)
    assert [tuple(g.originals.shape[-2:]) for g in grids[:2]] == [(16, 16), (8, 8)]
    assert grids[2].originals is None and "gone" in grids[2].problem
    assert {"reconstructions_1_digits", "reconstructions_2_digits"} <= set(made)
    assert "reconstructions_3_gone" not in made and _is_png(made["reconstructions_1_digits"][0])


def test_compact_summary_names_accuracy_each_attack_with_its_ci_and_the_strongest(frame):
    from leakbench.evaluation.tables import compact_summary

    lines = compact_summary(frame).splitlines()
    rows = {line.split("  ")[0].strip(): line for line in lines[3:]}
    assert list(rows) == ["none", "gaussian_noise scale=0.1", "gaussian_noise scale=0.5", "gaussian_noise scale=5.0"]
    assert rows["none"].split()[1:3] == ["0.900", "rmle"]  # rMLE's 70 dB beats PEEL's 60
    assert "60.0 [59.0, 61.0]" in rows["none"] and "70.0 [69.0, 71.0]" in rows["none"]
    assert rows["gaussian_noise scale=0.1"].split()[3] == "peel" and "failed" in rows["gaussian_noise scale=0.1"]
    assert rows["gaussian_noise scale=5.0"].endswith("n/a") and "0.500" in rows["gaussian_noise scale=5.0"]
    few = frame.assign(psnr_ci_low=None, psnr_ci_high=None)  # too few images for a bootstrap CI
    assert "60.0 no CI" in compact_summary(few) and "[59.0" not in compact_summary(few)


def test_compact_summary_fits_100_columns_on_a_realistic_frame(frame):
    """Two cuts x four defenses x five attack variants with long names: letters with a legend, every line within
    100 characters, and the attacks that do not fit on one line continue in a second block."""
    from leakbench.evaluation.tables import compact_summary

    variants = [{"refine": True, "solver": "torch"}, {"refine": False, "solver": "paper"},
                {"refine": False, "solver": "torch"}]
    cells = []
    for cut in ("layer1", "layer2"):
        for _, c in frame.iterrows():
            for i, params in enumerate([{"loss": "plain", "restarts": 1}, {"loss": "relu_consistency", "restarts": 2}]
                                       if c["attack"] == "rmle" else variants):
                shifted = {k: c[k] + i for k in ("psnr", "psnr_ci_low", "psnr_ci_high")}
                cells.append({**c, **shifted, "cut": cut, "attack_params": json.dumps(params),
                              "cell_key": f"{c['cell_key']}{cut}{i}"})
    text = compact_summary(pd.DataFrame(cells))
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines.count("layer1:") == 2 and lines.count("layer2:") == 2  # one heading per cut in each block
    assert "A = peel(refine=True, solver=torch)" in lines and "E = rmle(loss=relu_consistency, restarts=2)" in lines
    none = [line for line in lines if line.startswith("none ")]
    assert none[0].split()[2] == "E"  # rMLE with 71 dB, the strongest of the five
    assert "62.0 [61.0, 63.0]" in text and "71.0 [70.0, 72.0]" in text
