"""Choose each attack's defaults on the validation slice, with the same effort for every attack.

The validation slice is the tail of the digits test split (``evaluation.image_sets.tuning_indices``): no
experiment attacks it. Every attack gets the same number of candidates (``CANDIDATES`` per attack, a small
grid over the parameters its defaults fix) and, where it optimises the image, the same end-to-end budget
(``--budget`` evaluations per image). Each candidate is scored by its mean PSNR over the validation images in
every setting (the default target, ResNet-20 trained on digits as in ``experiments/default.yaml``, cut
after ``layer2``, undefended and under relative Gaussian noise 0.1 and 0.5); the best mean wins. Prints one
row per candidate and the chosen parameters. The heavy-noise setting was added when ``peel_prior`` was retuned
(its prior weight matters only under noise); ``peel``, ``rmle`` and ``inverse_net`` were chosen on the first
two settings and not retuned since. Run (about 12 min on 2 CPU cores; `peel_prior` adds about 10 min):

    .venv/bin/python benchmarks/tune_attacks.py --budget 200 --images 16
"""
from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import pandas as pd
import torch

from leakbench import attacks, defenses
from leakbench.evaluation.attack_context import auxiliary_split, query_oracle
from leakbench.evaluation.image_sets import tuning_indices
from leakbench.evaluation.metrics import image_metrics
from leakbench.splitnn import TrainConfig, datasets, split, train

#: The grid each attack is tuned over: the same number of candidates for every attack.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "peel": {"tv_weight": [0.0, 0.03, 0.3], "also_from_grey": [True, False]},
    "rmle": {"tv_weight": [0.0, 0.03, 0.3], "starts": [["grey"], ["zeros"]]},
    "inverse_net": {"lr": [0.001, 0.002, 0.005], "hidden": [32, 64]},
    # the decoder's own parameters are inverse_net's chosen ones; prior_scale 1 is the Gaussian MAP weight;
    # calibration 0 is the fit as it is (tv_weight 0 was chosen against 0.03 by the grid before calibration)
    "peel_prior": {"prior_scale": [0.1, 1.0, 3.0], "calibration": [0, 8]},
    # FORA's adversarial term (0: the MMD alone) and how long the substitute is fitted
    "fora": {"discriminator_weight": [0.0, 0.1, 1.0], "substitute_epochs": [10, 20]},
}
CANDIDATES = 6
SETTINGS = [("layer2", "none", {}), ("layer2", "gaussian_noise", {"scale": 0.1, "relative": True}),
            ("layer2", "gaussian_noise", {"scale": 0.5, "relative": True})]
#: Budget parameters per attack (the optimisation attacks share one end-to-end evaluation budget).
BUDGETED = {"peel": "max_evaluations", "rmle": "max_evaluations", "peel_prior": "max_evaluations"}


def candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def score(attack_name: str, params: dict[str, Any], model: torch.nn.Module, data: datasets.Dataset,
          truth: torch.Tensor, budget: int) -> list[dict[str, Any]]:
    rows = []
    for cut, defense_name, defense_params in SETTINGS:
        client, _ = split(model, cut)
        client.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            features = defenses.get(defense_name, **defense_params)(client(truth))
        full = dict(params)
        if attack_name in BUDGETED:
            full[BUDGETED[attack_name]] = budget
        attack = attacks.get(attack_name, **full)
        ctx: dict[str, Any] = {"image_shape": data.shape}
        if attacks.Knowledge.AUXILIARY_DATA in attack.knowledge:
            ctx["auxiliary"] = auxiliary_split(data, 0)
        if attacks.Knowledge.QUERY_ACCESS in attack.knowledge:
            ctx["query"] = query_oracle(client, defenses.get(defense_name, **defense_params), 0)
        if attacks.Knowledge.DEFENSE in attack.knowledge:
            ctx["defense"] = attacks.PublicDefense.of(defenses.get(defense_name, **defense_params))
        start = time.perf_counter()
        recon = attack.reconstruct(client, features, attacks.AttackContext(**ctx))
        psnr = image_metrics(recon.images, truth)["psnr"]
        setting = " ".join([defense_name, *(f"{v}" for k, v in defense_params.items() if k == "scale")])
        rows.append({"attack": attack_name, "params": str(params), "cut": cut, "setting": setting,
                     "psnr": sum(psnr) / len(psnr), "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=200, help="end-to-end evaluations per image (peel, rmle)")
    parser.add_argument("--images", type=int, default=None, help="the first N images of the validation slice")
    parser.add_argument("--attacks", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    args = parser.parse_args()
    for name in args.attacks:
        assert len(candidates(GRIDS[name])) == CANDIDATES, f"{name}: unequal tuning effort"
    data = datasets.get("digits")
    truth = data.x_test[tuning_indices(data)[:args.images]]
    model = train(TrainConfig("resnet20", "digits", epochs=10, lr=0.05, batch_size=64), progress=False).model.eval()
    rows = []
    for name in args.attacks:
        for params in candidates(GRIDS[name]):
            rows += score(name, params, model, data, truth, args.budget)
            print(f"{name} {params}: {sum(r['seconds'] for r in rows[-len(SETTINGS):]):.1f} s", flush=True)
    frame = pd.DataFrame(rows)
    per_candidate = frame.pivot_table(index=["attack", "params"], columns="setting", values="psnr")
    per_candidate["mean"] = per_candidate.mean(axis=1)
    print(f"\nMean PSNR (dB) over {len(truth)} validation images, {args.budget} end-to-end evaluations per image:\n")
    print(per_candidate.round(2).to_markdown())
    print("\nchosen:")
    for name in args.attacks:
        best = per_candidate.loc[name]["mean"].idxmax()
        print(f"  {name}: {best}  (mean {per_candidate.loc[(name, best), 'mean']:.2f} dB)")


if __name__ == "__main__":
    main()
