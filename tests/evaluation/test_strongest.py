"""The strongest-attacker rows: per image the most leakage any attacker reached on the same defended features."""
import json

import numpy as np
import pandas as pd

from leakbench.evaluation.strongest import STRONGEST, strongest_rows, with_strongest
from leakbench.evaluation.tables import compact_summary, matrix_table

N = 12  # images per cell: enough for a BCa interval


def _cell(key, attack, defense="none", seed=0, status="done", current=True, params=None, cut="layer1"):
    config = {"dataset": {"name": "digits", "params": {}}, "model": {"name": "resnet20", "params": {}},
              "cut": cut, "defense": {"name": defense, "params": {}}, "seed": seed,
              "attack": {"name": attack, "params": params or {}}, "evaluation": {"num_images": N}}
    return {"cell_key": key, "dataset": "digits", "model": "resnet20", "cut": cut, "defense": defense,
            "defense_params": "{}", "attack": attack, "attack_params": json.dumps(params or {}), "seed": seed,
            "status": status, "accuracy": 0.9, "guarantee_json": "{}", "config_json": json.dumps(config),
            "is_current": current, "wall_time_s": 1.0, "psnr": np.nan, "reason": None}


def _images(key, psnr):
    psnr = np.asarray(psnr, dtype=float)
    return pd.DataFrame({"cell_key": key, "image_index": np.arange(len(psnr)), "psnr": psnr,
                         "mse": 10 ** (-psnr / 10)})


def _store(rng, cut="layer1"):
    a, b = rng.uniform(10, 30, N), rng.uniform(10, 30, N)
    cells = pd.DataFrame([_cell(f"a{cut}", "rmle", cut=cut), _cell(f"b{cut}", "peel", cut=cut),
                          _cell(f"c{cut}", "rmle", defense="gaussian_noise", cut=cut)])
    images = pd.concat([_images(f"a{cut}", a), _images(f"b{cut}", b), _images(f"c{cut}", a - 5)], ignore_index=True)
    cells["psnr"] = [a.mean(), b.mean(), (a - 5).mean()]
    return cells, images, a, b


def test_each_image_gets_the_most_leakage_any_attacker_reached():
    cells, images, a, b = _store(np.random.default_rng(0))
    rows, per_image = strongest_rows(cells, images)
    assert len(rows) == 1  # the noise group has one attacker: no strongest row
    row = rows.iloc[0]
    assert row["attack"] == STRONGEST and row["defense"] == "none" and row["accuracy"] == 0.9
    np.testing.assert_allclose(per_image["psnr"], np.maximum(a, b))
    np.testing.assert_allclose(per_image["mse"], np.minimum(10 ** (-a / 10), 10 ** (-b / 10)))  # lower leaks more
    assert row["psnr"] == np.maximum(a, b).mean() >= max(a.mean(), b.mean())
    assert row["psnr_ci_low"] < row["psnr"] < row["psnr_ci_high"]
    wins = int((b > a).sum())
    assert row["strongest_by"].startswith(("peel" if wins > N - wins else "rmle"))
    assert f"peel {wins}/{N}" in row["strongest_by"] and f"rmle {N - wins}/{N}" in row["strongest_by"]
    assert row["psnr_p95"] == np.percentile(np.maximum(a, b), 95)


def test_failed_stale_and_other_seed_cells_are_not_pooled():
    cells, images, a, b = _store(np.random.default_rng(1))
    extra = pd.DataFrame([_cell("d", "shadow", status="failed"), _cell("e", "inverse_net", current=False),
                          _cell("f", "inverse_net", seed=1)])
    high = _images("d", a + 50), _images("e", a + 50), _images("f", a + 50)
    rows, per_image = strongest_rows(pd.concat([cells, extra], ignore_index=True), pd.concat([images, *high]))
    assert len(rows) == 1 and rows.iloc[0]["strongest_of"] == "rmle; peel"
    np.testing.assert_allclose(per_image["psnr"], np.maximum(a, b))


def test_tables_and_the_summary_show_the_strongest_row():
    cells, images, a, b = _store(np.random.default_rng(2))
    shown = with_strongest(cells, images)
    assert len(shown) == len(cells) + 1
    table = matrix_table(shown)
    assert table.loc[table["defense"] == "none", "strongest: PSNR (dB)"].item() == np.maximum(a, b).mean()
    summary = compact_summary(shown)
    assert "best/img" in summary and all(len(line) <= 100 for line in summary.splitlines())
    winner = "peel" if (b > a).sum() > N / 2 else "rmle"
    none_line = next(line for line in summary.splitlines() if line.startswith("none"))
    assert none_line.split()[2] == winner
    assert with_strongest(cells.iloc[:1], images) is not None and len(with_strongest(cells.iloc[:1], images)) == 1


def test_the_depth_figure_draws_the_strongest_leakage_per_cut(tmp_path):
    from leakbench.evaluation import figures

    rng = np.random.default_rng(3)
    frames = []
    for cut, shift in (("layer1", 0.0), ("layer2", -5.0)):
        cells, images, _, _ = _store(rng, cut)
        images["psnr"] += shift
        frames.append((cells, images))
    cells = pd.concat([f[0] for f in frames], ignore_index=True)
    images = pd.concat([f[1] for f in frames], ignore_index=True)
    shown = with_strongest(cells, images)
    # one per cut (the noise rows have one attacker per cut: cuts are never pooled)
    assert list(shown.loc[shown["attack"] == STRONGEST, "cut"]) == ["layer1", "layer2"]
    paths = figures.leakage_by_depth(shown, tmp_path / "depth")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    assert figures.leakage_by_depth(shown[shown["cut"] == "layer1"], tmp_path / "one") == []  # one cut: no figure
