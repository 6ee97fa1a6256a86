"""The runner passes attacks what their declared knowledge entitles them to, and marks cells whose attack
needs knowledge the defense denies as not applicable (from the declaration, not by running them). That every
registered attack reads only what its knowledge grants, and records its budget with the same keys, is the
contract suite's (tests/contracts/test_attack_contracts.py)."""
import textwrap

import pytest
import torch

from harness import digits16
from harness import present_fields as present
from leakbench import attacks, defenses
from leakbench.attacks.base import AttackContext, Knowledge, PublicDefense
from leakbench.contracts import MissingContext
from leakbench.defenses import base as defense_base
from leakbench.evaluation import Matrix, ResultStore, load_config
from leakbench.evaluation.attack_context import attack_context, auxiliary_split, denied, query_oracle
from leakbench.splitnn import split, zoo


#: The base of a feature defense (``FeatureDefense`` once the defenses have two bases; ``Defense`` before).
FeatureBase = getattr(defense_base, "FeatureDefense", defense_base.Defense)


class SecretKeyDefense(FeatureBase):
    """A client whose weights are keyed by a secret: white-box attackers do not get them."""

    denies = frozenset({Knowledge.CLIENT_WEIGHTS})

    def transform(self, features):
        return features


CONFIG = """
name: knowledge
seed: 0
dataset: {name: digits, params: {size: 16}}
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses: [secret_key]
attacks:
  - {name: rmle, params: {iterations: 5}}
  - {name: peel, params: {adaptive: true, max_iter: 2, refine_iter: 2}}
  - {name: inverse_net, params: {epochs: 1}}
  - {name: shadow, params: {epochs: 1, iterations: 2}}
  - {name: fora, params: {substitute_epochs: 1, decoder_epochs: 1}}
  - {name: unsplit, params: {rounds: 1, image_steps: 1, model_steps: 1}}
  - {name: peel_prior, params: {epochs: 1, max_iter: 2, refine_iter: 2}}
evaluation: {num_images: 2}
"""


@pytest.fixture
def secret_key(monkeypatch):
    from leakbench.defenses.registry import _registry

    monkeypatch.setitem(_registry._factories, "secret_key", SecretKeyDefense)
    monkeypatch.setattr(SecretKeyDefense, "name", "secret_key")


def test_white_box_cells_are_not_applicable_behind_a_defense_that_denies_client_weights(secret_key, tmp_path):
    path = tmp_path / "k.yaml"
    raw = textwrap.dedent(CONFIG)
    path.write_text(raw)
    config = load_config(path)
    with ResultStore(tmp_path / "r.sqlite") as store:
        Matrix(config, progress=False).run(store)
        cells = store.cells().set_index("attack")
    for white_box in ("rmle", "peel", "peel_prior"):
        assert cells.loc[white_box, "status"] == "not_applicable"
        assert "client_weights" in cells.loc[white_box, "reason"]
    assert cells.loc["inverse_net", "status"] == "done"  # black box: queries and auxiliary data
    assert cells.loc["shadow", "status"] == "done"       # query-free: server half and auxiliary data
    assert cells.loc["fora", "status"] == "done"         # auxiliary data and the observed features only
    assert cells.loc["unsplit", "status"] == "done"      # the architecture only


def test_denied_reads_the_declared_knowledge():
    secret = SecretKeyDefense()
    assert "client_weights" in denied(attacks.get("rmle"), secret)
    assert denied(attacks.get("inverse_net"), secret) == ""
    assert denied(attacks.get("rmle"), defenses.get("gaussian_noise")) == ""  # the base class denies nothing


def test_context_follows_knowledge_and_auxiliary_data_is_half_the_training_set():
    data = digits16()
    client, server = split(zoo.get("resnet20").eval(), "layer1")
    noise = defenses.get("gaussian_noise", scale=0.5)
    common = dict(data=data, client=client, server=server, defense=noise, seed=0, cache_dir="c", cache_key={})
    assert present(attack_context(attacks.get("rmle"), **common)) == {"image_shape", "cache_dir", "cache_key"}
    assert present(attack_context(attacks.get("inverse_net"), **common)) == {"image_shape", "cache_dir", "cache_key",
                                                                             "auxiliary", "query"}
    assert present(attack_context(attacks.get("shadow"), **common)) == {"image_shape", "cache_dir", "cache_key",
                                                                        "auxiliary", "server"}
    assert present(attack_context(attacks.get("fora"), **common)) == {"image_shape", "cache_dir", "cache_key",
                                                                      "auxiliary"}
    assert present(attack_context(attacks.get("unsplit"), **common)) == {"image_shape", "cache_dir", "cache_key"}
    assert present(attack_context(attacks.get("peel_prior"), **common)) == {
        "image_shape", "cache_dir", "cache_key", "auxiliary", "query", "defense"}
    assert attack_context(attacks.get("peel"), **common).defense is None
    aware = attack_context(attacks.get("peel", adaptive=True), **common).defense
    assert aware == PublicDefense("gaussian_noise", "transform", {"scale": 0.5, "relative": True}, type(noise))
    assert not hasattr(aware, "generator")  # the kind and public parameters, never the random stream

    images, labels = auxiliary_split(data, seed=0)
    assert len(images) == len(data.x_train) // 2 and len(labels) == len(images)
    flat_train = data.x_train.flatten(1)
    assert all(bool((flat_train == im.flatten()).all(dim=1).any()) for im in images[:20])  # rows of the training set
    assert torch.equal(auxiliary_split(data, seed=0)[0], images)  # fixed per seed
    assert not torch.equal(auxiliary_split(data, seed=1)[0], images)


def test_query_noise_is_a_fresh_stream():
    client, _ = split(zoo.get("resnet20").eval(), "layer1")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        clean = client(x)
        attacked = defenses.get("gaussian_noise", scale=0.5, seed=0)(clean)
    queried = query_oracle(client, defenses.get("gaussian_noise", scale=0.5, seed=0), seed=0)(x)
    assert not torch.allclose(queried - clean, attacked - clean)  # the attacker cannot replay the cell's noise
    assert torch.equal(queried, query_oracle(client, defenses.get("gaussian_noise", scale=0.5, seed=0), seed=0)(x))


def test_knowledge_is_a_property_of_the_parameters():
    peel = attacks.attack_class("peel")
    assert attacks.get("peel", adaptive=True).knowledge == {Knowledge.CLIENT_WEIGHTS, Knowledge.DEFENSE}
    assert attacks.get("peel").knowledge == peel.base_knowledge == {Knowledge.CLIENT_WEIGHTS}  # class unchanged


def test_the_context_reduces_a_defense_object_to_its_public_view():
    noise = defenses.get("gaussian_noise", scale=0.2, seed=3)
    context = AttackContext(image_shape=[3, 8, 8], defense=noise)
    assert context.image_shape == (3, 8, 8) and isinstance(context.defense, PublicDefense)
    assert context.defense.cls is type(noise) and not hasattr(context.defense, "seed")
    with pytest.raises(ValueError, match="image_shape"):
        AttackContext(image_shape=(8, 8))
    with pytest.raises(MissingContext, match="image_shape"):
        attacks.get("rmle").reconstruct(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), AttackContext())


def test_a_library_call_needs_only_the_image_shape():
    """The README's call: no runner, only what a white-box attacker has."""
    from leakbench.attacks import AttackContext as Context  # the public name

    client, _ = split(zoo.get("resnet20").eval(), "layer1")
    with torch.no_grad():
        features = defenses.get("gaussian_noise", scale=0.1)(client(torch.rand(2, 3, 32, 32)))
    recon = attacks.get("peel", max_iter=2, block_iter=2, refine_iter=3).reconstruct(
        client, features, Context(image_shape=(3, 32, 32)))
    assert recon.images.shape == (2, 3, 32, 32) and 0 <= float(recon.images.min()) <= float(recon.images.max()) <= 1


def test_the_depth_figure_reads_the_attack_declaration(monkeypatch):
    """Which attacks' rows carry per-block errors comes from ``Attack.reports_block_errors``, not a name."""
    from leakbench.attacks.registry import _registry
    from leakbench.evaluation.figures import _reports_block_errors

    class Chained(attacks.Attack):
        reports_block_errors = True

    monkeypatch.setitem(_registry._factories, "chained", Chained)
    assert _reports_block_errors("peel") and _reports_block_errors("chained")
    assert not _reports_block_errors("rmle") and not _reports_block_errors("gone")
