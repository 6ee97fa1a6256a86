import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from leakbench.evaluation.compare import compare
from leakbench.evaluation.statistics import MIN_CI_SAMPLES, N_RESAMPLES, PairedDifference, paired_difference, summarize


def test_bca_interval_covers_a_skewed_mean_at_small_n():
    """Over 300 draws of n = 16 from an exponential (mean 1), the nominal 95 % interval covers the mean ~0.9."""
    rng = np.random.default_rng(0)
    covered = [low <= 1.0 <= high for low, high in
               (summarize(rng.exponential(1.0, 16), seed=i)[1:] for i in range(300))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_interval_is_scipys_bca():
    data = np.random.default_rng(1).exponential(1.0, 20)
    mean, low, high = summarize(data, confidence=0.9, seed=3)
    ref = scipy.stats.bootstrap((data,), np.mean, confidence_level=0.9, method="BCa", n_resamples=N_RESAMPLES,
                                rng=np.random.default_rng(3)).confidence_interval
    assert mean == pytest.approx(data.mean()) and (low, high) == pytest.approx((ref.low, ref.high))
    assert low < mean < high


def test_no_bounds_below_the_minimum_or_for_non_finite_values():
    few = np.arange(MIN_CI_SAMPLES - 1, dtype=float)
    mean, low, high = summarize(few)
    assert mean == few.mean() and math.isnan(low) and math.isnan(high)
    assert all(math.isfinite(v) for v in summarize(np.arange(MIN_CI_SAMPLES, dtype=float)))
    with_inf = [1.0] * MIN_CI_SAMPLES + [math.inf]
    assert math.isnan(summarize(with_inf)[1]) and math.isnan(summarize([math.nan] * 20)[2])
    assert all(math.isnan(v) for v in summarize([]))


def test_constant_data_give_a_zero_width_interval():
    assert summarize([2.0] * MIN_CI_SAMPLES) == (2.0, 2.0, 2.0)
    rounded = 1.0 + np.array([0.0, 4e-16, -4e-16] * MIN_CI_SAMPLES)  # differences of equal values, as floats give
    assert summarize(rounded)[1:] == pytest.approx((1.0, 1.0))


def _spread_pairs(shift, n=40, seed=0):
    """Per-image values with a large spread between images (10-40 dB) and a small difference between attacks."""
    rng = np.random.default_rng(seed)
    b = rng.uniform(10, 40, n)
    return b + shift + rng.normal(0, 0.1, n), b


def test_pairing_detects_a_small_consistent_difference_the_means_hide():
    a, b = _spread_pairs(0.3)
    result = paired_difference(a, b, seeds=np.repeat([0, 1, 2, 3], 10))
    assert isinstance(result, PairedDifference) and result.verdict == "a > b"
    assert result.low < 0.3 < result.high and result.mean_difference == pytest.approx(np.mean(a - b))
    assert (result.n_pairs, result.n_seeds) == (40, 4) and result.mean_a > result.mean_b
    _, low_a, high_a = summarize(a)
    _, low_b, high_b = summarize(b)
    assert low_a < high_b and low_b < high_a  # unpaired intervals overlap: they could not tell
    assert paired_difference(b, a).verdict == "a < b"


def test_no_difference_and_too_few_pairs():
    a, b = _spread_pairs(0.0)
    result = paired_difference(a, b)
    assert result.verdict == "no difference at 95%" and result.low < 0 < result.high and result.n_seeds is None
    assert paired_difference(a[:MIN_CI_SAMPLES - 1], b[:MIN_CI_SAMPLES - 1]).verdict.startswith("too few pairs")
    with pytest.raises(ValueError, match="aligned"):
        paired_difference(a, b[:-1])


# -- compare: from the store's frames ----------------------------------------------------------------------------

GROUPS = {"none": 2.0, "noise": 0.0}  # defense -> how much higher PEEL's PSNR is than rMLE's, per image


def _frames(seeds=(0, 1, 2), images=16):
    """cells and images frames as the store gives them: two attacks, two defenses, three seeds, per-image PSNR."""
    rng = np.random.default_rng(0)
    cells, rows = [], []
    for defense, gain in GROUPS.items():
        for seed in seeds:
            base = rng.uniform(10, 40, images)  # the same images, attacked twice
            noise = {attack: rng.normal(0, 0.3, images) for attack in ("peel", "rmle")}
            noise = {attack: e - e.mean() for attack, e in noise.items()}  # the mean difference is exactly gain
            for attack, params in (("peel", '{"refine_iter": 50}'), ("rmle", '{"iterations": 100}')):
                key = f"{defense}-{attack}-{seed}"
                cells.append(dict(cell_key=key, dataset="digits", model="resnet20", cut="layer1", defense=defense,
                                  defense_params="{}", attack=attack, attack_params=params, seed=seed,
                                  status="done"))
                value = base + noise[attack] + (gain if attack == "peel" else 0.0)
                rows += [dict(cell_key=key, image_index=i, psnr=v, mse=10 ** (-v / 10)) for i, v in enumerate(value)]
    cells.append(dict(cells[0], cell_key="failed-peel", status="failed"))  # same pairs as a done cell: not counted
    rows += [dict(r, cell_key="failed-peel", psnr=99.0) for r in rows if r["cell_key"] == cells[0]["cell_key"]]
    return pd.DataFrame(rows).sample(frac=1, random_state=0), pd.DataFrame(cells)


def test_compare_pairs_per_image_and_gives_one_row_per_group():
    images, cells = _frames()
    table = compare(images, cells, {"attack": "peel"}, {"attack": "rmle"}, "psnr").set_index("defense")
    assert list(table.index) == ["noise", "none"] and (table.n_pairs == 48).all() and (table.n_seeds == 3).all()
    assert table.loc["none", "verdict"] == "a > b" and table.loc["none", "leaks_more"] == "a"
    assert table.loc["none", "low"] < 2.0 < table.loc["none", "high"]
    assert table.loc["noise", "verdict"] == "no difference at 95%" and table.loc["noise", "leaks_more"] == ""
    mse = compare(images, cells, {"attack": "peel"}, {"attack": "rmle"}, "mse").set_index("defense")
    assert mse.loc["none", "verdict"] == "a < b" and mse.loc["none", "leaks_more"] == "a"  # lower MSE leaks more


def test_compare_aligns_pairs_by_seed_and_image():
    images, cells = _frames()
    peel = images.cell_key.str.contains("peel") & ~images.cell_key.str.startswith("failed")
    exact = images.copy()
    rmle = exact[~peel].set_index(["cell_key", "image_index"]).psnr
    exact.loc[peel, "psnr"] = [rmle[(k.replace("peel", "rmle"), i)] + 1.0
                               for k, i in zip(exact.cell_key[peel], exact.image_index[peel])]
    table = compare(exact, cells, {"attack": "peel"}, {"attack": "rmle"}, "psnr")
    assert np.allclose(table[["mean_difference", "low", "high"]], 1.0)  # misaligned pairs would spread


def test_selectors_take_predicates_and_parsed_params():
    images, cells = _frames()
    by_params = compare(images, cells, {"attack_params": {"refine_iter": 50}},
                        {"attack": lambda name: name.startswith("rm")}, "psnr")
    by_name = compare(images, cells, {"attack": "peel"}, {"attack": "rmle"}, "psnr")
    pd.testing.assert_frame_equal(by_params, by_name)
    one_seed = compare(images, cells, {"attack": "peel", "seed": 0}, {"attack": "rmle"}, "psnr")
    assert (one_seed.n_pairs == 16).all() and (one_seed.n_seeds == 1).all()


def test_ambiguous_or_overlapping_selections_are_refused():
    images, cells = _frames()
    with pytest.raises(ValueError, match="several cells"):
        compare(images, cells, {"attack": lambda _: True, "defense": "none"},
                {"attack": "rmle", "defense": "noise"}, "psnr")
    with pytest.raises(ValueError, match="match both"):
        compare(images, cells, {"attack": "peel"}, {"dataset": "digits"}, "psnr")
    with pytest.raises(KeyError, match="lpips"):
        compare(images, cells, {"attack": "peel"}, {"attack": "rmle"}, "lpips")
