import pytest
import torch

from leakbench import defenses
from leakbench.splitnn import ParameterError


def test_noise_of_scale_zero_is_the_identity():
    f = torch.randn(4, 16, 8, 8)
    for relative in (True, False):
        assert torch.equal(defenses.get("gaussian_noise", scale=0.0, relative=relative)(f), f)
    assert torch.equal(defenses.get("none")(f), f)


def test_noise_is_seeded():
    f = torch.randn(4, 16, 8, 8)
    a = defenses.get("gaussian_noise", scale=0.3, seed=7)(f)
    b = defenses.get("gaussian_noise", scale=0.3, seed=7)(f)
    c = defenses.get("gaussian_noise", scale=0.3, seed=8)(f)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_relative_noise_scales_with_each_samples_rms():
    f = torch.randn(64, 32, 16, 16)
    f[32:] *= 10
    noisy = defenses.get("gaussian_noise", scale=0.5, relative=True)(f)
    noise_std = (noisy - f).flatten(1).std(dim=1)
    rms = f.flatten(1).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(noise_std / rms, torch.full((64,), 0.5), rtol=0.05)


def test_absolute_noise_has_the_given_std():
    f = torch.zeros(8, 64, 32, 32)
    noisy = defenses.get("gaussian_noise", scale=0.2, relative=False)(f)
    assert abs(float(noisy.std()) - 0.2) < 0.005


@pytest.mark.parametrize("params, key", [({"scale": -1.0}, "scale"), ({"relative": "yes"}, "relative"),
                                         ({"sigma": 1.0}, "sigma")])
def test_bad_parameters_are_rejected_with_the_key(params, key):
    with pytest.raises(ParameterError) as info:
        defenses.get("gaussian_noise", **params)
    assert info.value.key == key


def test_unknown_defense_lists_the_known_ones():
    with pytest.raises(ParameterError, match="gaussian_noise"):
        defenses.get("no_such_defense")
