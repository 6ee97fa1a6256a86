"""random_projection: the rotation it draws (orthogonal, determinant 1, a geodesic from the identity), the server's
accuracy kept by the fine-tuned adapter, and PEEL against the known client failing on the projected features."""
import pytest
import torch

from harness import psnr
from leakbench import attacks, defenses
from leakbench.attacks.base import AttackContext, PublicDefense
from leakbench.defenses.projection import haar_rotation, rotation_power
from leakbench.splitnn import SplitModel
from leakbench.splitnn.training import accuracy


def test_the_rotation_is_orthogonal_and_its_powers_run_from_the_identity_to_it():
    rotation = haar_rotation(16, torch.Generator().manual_seed(0))
    eye = torch.eye(16, dtype=torch.float64)
    # float64 products of 16x16 factors (QR, an eigendecomposition): 1e-9 holds on any CPU's kernels
    assert torch.allclose(rotation @ rotation.T, eye, atol=1e-9)
    assert torch.linalg.det(rotation) == pytest.approx(1.0)
    half = rotation_power(rotation, 0.5)
    assert torch.allclose(half @ half.T, eye, atol=1e-9) and torch.allclose(half @ half, rotation, atol=1e-9)
    assert torch.equal(rotation_power(rotation, 0.0), eye) and torch.equal(rotation_power(rotation, 1.0), rotation)
    assert 0 < float((half - eye).norm()) < float((rotation - eye).norm())


def test_it_keeps_k_channels_and_its_matrix_survives_a_reseeded_copy(small_split):
    client, data = small_split.client, small_split.data
    projection = defenses.get("random_projection", keep=0.25, finetune_epochs=0, seed=1)
    with pytest.raises(RuntimeError, match="fitted first"):
        projection(torch.zeros(1, 16, 16, 16))
    projection.fit(client, small_split.server, data.x_train[:32], data.y_train[:32])
    with torch.no_grad():
        features = client(data.x_test[:4])
    out = projection(features)
    assert out[:, 4:].abs().max() == 0 and out[:, :4].abs().amax(dim=(0, 2, 3)).min() > 0  # 4 of 16 channels sent
    # the query oracle runs a copy reseeded elsewhere: the same matrix, so queries see what the attacked client sends
    assert torch.equal(projection.reseeded(12345)(features), out)
    other = defenses.get("random_projection", keep=0.25, finetune_epochs=0, seed=2)
    other.fit(client, small_split.server, data.x_train[:32], data.y_train[:32])
    assert not torch.allclose(other(features), out)  # another seed, another matrix


def test_the_fine_tuned_server_keeps_the_accuracy(small_split):
    """The adapter learns the rotated basis from labels: test accuracy within 2 points of the undefended split,
    where the server fed rotated features untuned is near chance."""
    client, server, data = small_split.client, small_split.server, small_split.data
    plain = accuracy(SplitModel(client, server), data.x_test, data.y_test)
    before = {k: v.clone() for k, v in server.state_dict().items()}
    projection = defenses.get("random_projection")
    tuned = projection.fit(client, server, data.x_train, data.y_train)
    assert all(torch.equal(before[k], v) for k, v in server.state_dict().items())  # the server itself is frozen
    assert accuracy(SplitModel(client, tuned, projection), data.x_test, data.y_test) >= plain - 0.02
    assert accuracy(SplitModel(client, server, projection), data.x_test, data.y_test) < 0.3
    with torch.no_grad():  # a rotation (keep 1): every sample's features keep their norm
        clean = client(data.x_test[:8])
    assert torch.allclose(projection(clean).flatten(1).norm(dim=1), clean.flatten(1).norm(dim=1), rtol=1e-4)


def test_peel_against_the_known_client_fails_on_the_projected_features(small_split):
    """PEEL inverts the known client from its own features (> 25 dB) but not from the same features in the
    secret basis (< 10 dB): it fits the client's features to features it never computed."""
    client, data = small_split.client, small_split.data
    x = data.x_test[:2]
    projection = defenses.get("random_projection", finetune_epochs=0)
    projection.fit(client, small_split.server, data.x_train[:32], data.y_train[:32])
    with torch.no_grad():
        clean = client(x)
    peel = attacks.get("peel", max_iter=30, refine_iter=150)
    context = AttackContext(image_shape=data.shape, defense=PublicDefense.of(projection))
    undefended = psnr(peel.reconstruct(client, clean, context).images, x)
    projected = psnr(peel.reconstruct(client, projection(clean), context).images, x)
    assert undefended > 25 and projected < 10, (undefended, projected)
