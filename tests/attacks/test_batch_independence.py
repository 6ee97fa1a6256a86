"""A sample's reconstruction does not depend on the other samples of its batch: block-wise, refined and
defense-aware PEEL and rMLE give a sample the same image in a batch of three as alone.

The cuts are not injective (a stride-2 block; post-ReLU blocks), so no solve is trivially exact and the
trajectories themselves must agree. The tolerance (1e-5 relative) allows for float work reordered across batch
sizes, which differs by CPU; the last test shows the check fails once samples are coupled.
"""
import pytest
import torch

import leakbench.attacks.optim  # noqa: F401  (attacks.optim is used as an attribute)
from harness import batch_gap, randomise_batchnorm
from leakbench import attacks, defenses
from leakbench.attacks.base import AttackContext, PublicDefense
from leakbench.splitnn import split, zoo

TOLERANCE = 1e-5
SHAPE = (3, 12, 12)


SETTINGS = {"authors": {"norm": "none", "post_relu": False}, "standard": {}}


def _cut(setting: str, cut: str = "layer2.0"):
    torch.manual_seed(0)
    model = zoo.get("resnet20", **SETTINGS[setting]).eval().double()
    randomise_batchnorm(model)
    client, _ = split(model, cut)
    x = torch.rand(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        return client, x, client(x)


def gap(attack, client, features, **ctx) -> tuple[float, torch.Tensor]:
    """(relative difference of sample 1 solved in the batch and alone, its image in the batch): harness.batch_gap,
    which the contract suite (tests/contracts/) runs on every attack that claims batch independence."""
    return batch_gap(attack, client, features, AttackContext(image_shape=SHAPE, **ctx))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name, params", [
    ("peel", {"refine": False}),                               # block-wise: fixed point or least-norm prior
    ("peel", {"max_iter": 20, "refine_iter": 30}),             # refined: two starts, chosen per sample
    ("rmle", {"iterations": 30}),
    ("rmle", {"iterations": 30, "loss": "relu_consistency", "starts": ["grey", "uniform"], "max_evaluations": 40}),
])
def test_a_sample_is_reconstructed_as_if_it_were_alone(setting, name, params):
    client, x, features = _cut(setting)
    difference, image = gap(attacks.get(name, **params), client, features)
    assert float((image - x[1:2]).pow(2).mean()) > 1e-6  # not trivially exact
    assert difference < TOLERANCE


@pytest.mark.parametrize("defense, params", [("gaussian_noise", {"scale": 0.2}), ("topk", {"keep": 0.3}),
                                             ("dropout", {"p": 0.3})])
def test_defense_aware_peel_reconstructs_a_sample_as_if_it_were_alone(defense, params):
    client, _, clean = _cut("standard", "layer1.1")
    guard = defenses.get(defense, **params)
    features = guard(clean)
    peel = attacks.get("peel", adaptive=True, max_iter=20, refine_iter=30)
    rec = peel.reconstruct(client, features, AttackContext(image_shape=SHAPE, defense=PublicDefense.of(guard)))
    assert rec.diagnostics["adaptive"]["model"] in ("noise", "masked")  # the defense changes the fit
    difference, _ = gap(peel, client, features, defense=PublicDefense.of(guard))
    assert difference < TOLERANCE


def test_the_check_fails_when_samples_are_coupled(monkeypatch):
    """One objective for the whole batch (a shared line search and stopping rule, as SciPy's was): the same
    check then sees the batch change a sample's result."""
    client, _, features = _cut("standard")
    rmle = attacks.get("rmle", iterations=30, tv_weight=0.0)
    assert gap(rmle, client, features)[0] < TOLERANCE
    solve = attacks.optim.minimize_box

    def coupled(loss, x0, **options):
        return solve(lambda x: loss(x).sum().expand(len(x)), x0, **options)

    monkeypatch.setattr(attacks.optim, "minimize_box", coupled)
    assert gap(rmle, client, features)[0] > 100 * TOLERANCE
