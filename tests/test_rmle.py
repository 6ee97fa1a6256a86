import torch

import attacks
from splitnn import split, zoo


def test_rmle_recovers_the_image_through_the_stem():
    model = zoo.get("resnet20").eval()
    client, _ = split(model, "relu")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        features = client(x)
    rec = attacks.get("rmle", iterations=300).reconstruct(client, features, image_shape=(3, 16, 16))
    assert float(((rec.images - x) ** 2).mean()) < 1e-4
    assert rec.diagnostics["iterations"] > 0


def test_tv_prior_smooths_the_reconstruction():
    from attacks.rmle import total_variation

    model = zoo.get("resnet20").eval()
    client, _ = split(model, "layer1")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        features = client(x) + 0.5 * torch.randn_like(client(x))
    plain = attacks.get("rmle", iterations=50).reconstruct(client, features, image_shape=(3, 16, 16))
    smooth = attacks.get("rmle", iterations=50, tv_weight=1.0).reconstruct(client, features,
                                                                          image_shape=(3, 16, 16))
    assert float(total_variation(smooth.images)) < float(total_variation(plain.images))
