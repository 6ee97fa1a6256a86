"""The contract every registered attack keeps, generated from the registry (``attacks.names()``, read when the
module is collected): it runs on the context the runner builds from its declared knowledge and on nothing more
(and an absent grant is a MissingContext naming it); its reconstruction has the image shape, is finite and lies
in [0, 1] (the box ``Reconstruction`` promises for every attack); it records its budget with the same keys as
every other; it takes no truth; bad parameters are refused naming the key; and a sample's reconstruction does
not depend on the rest of its batch where the attack claims so; and an attack that does not declare the client's
weights gives the same reconstruction whatever weights the client it is handed holds."""
import copy
import dataclasses
import functools

import pytest
import torch

from harness import bad_values, batch_gap, present_fields
from leakbench import attacks, defenses
from leakbench.attacks import InverseNet, PEEL, RMLE, Shadow
from leakbench.attacks.base import BUDGET_KEYS, AttackContext
from leakbench.contracts import GRANTS, Knowledge, MissingContext
from leakbench.evaluation.attack_context import attack_context
from leakbench.splitnn import ParameterError

#: Budgets that keep each registered attack to about a second on the tiny cut; one not listed runs at its defaults.
CHEAP = {"rmle": {"iterations": 3}, "peel": {"max_iter": 2, "block_iter": 2, "refine_iter": 3},
         "inverse_net": {"epochs": 1}, "shadow": {"epochs": 1, "iterations": 3},
         "fora": {"substitute_epochs": 1, "decoder_epochs": 1},
         "peel_prior": {"epochs": 1, "max_iter": 2, "refine_iter": 3},
         "unsplit": {"rounds": 2, "image_steps": 2, "model_steps": 2}}

#: The attacks that claim a sample's reconstruction is independent of its batch (one independent solve or decoder
#: pass per sample; the shadow and the decoder train on auxiliary data only). The claim belongs on the class
#: (``batch_independent``); until ``Attack`` declares it, it is read from here, keyed by class.
BATCH_INDEPENDENT = (RMLE, PEEL, InverseNet, Shadow)
#: Float work reordered across batch sizes differs by CPU (tests/attacks/test_batch_independence.py).
TOLERANCE = 1e-5


def attack_cases() -> list:
    """One case per registered attack, read from the registry when called."""
    return [pytest.param(name, id=name) for name in attacks.names()]


def claims_batch_independence(cls: type) -> bool:
    return bool(getattr(cls, "batch_independent", issubclass(cls, BATCH_INDEPENDENT)))


def granted(name: str, cut) -> tuple[attacks.Attack, AttackContext]:
    """The attack at its cheap budget and the context the runner grants it: exactly what its knowledge entitles it
    to, behind no defense."""
    attack = attacks.get(name, **CHEAP.get(name, {}))
    return attack, attack_context(attack, data=cut.data, client=cut.client, server=cut.server,
                                  defense=defenses.get("none"), seed=0, cache_dir=None, cache_key={})


@pytest.fixture(scope="module")
def reconstructed(tiny_cut):
    """name -> (attack, its granted context, its reconstruction of the tiny cut's features), computed once."""
    @functools.cache
    def run(name: str):
        attack, context = granted(name, tiny_cut)
        ok, reason = attack.supports(tiny_cut.client)
        if not ok:
            pytest.skip(f"{name} does not support the tiny cut: {reason}")
        return attack, context, attack.reconstruct(tiny_cut.client, tiny_cut.features, context)
    return run


@pytest.mark.parametrize("name", attack_cases())
def test_it_reads_only_what_its_knowledge_grants(name, tiny_cut):
    """The runner grants exactly the fields of the declared knowledge; reading one it does not declare is refused,
    and an absent required field is a clear error naming it and the knowledge that grants it."""
    attack, context = granted(name, tiny_cut)
    assert present_fields(context) & set(GRANTS) == {f for f, k in GRANTS.items() if k in attack.knowledge}
    for field, knowledge in GRANTS.items():
        if knowledge in attack.knowledge:
            with pytest.raises(MissingContext, match=f"{field}=.*Knowledge.{knowledge.name}"):
                AttackContext(image_shape=tiny_cut.data.shape).require(field, by=attack)
            try:  # given less than it declared, it either manages without or says what is missing
                attack.reconstruct(tiny_cut.client, tiny_cut.features, dataclasses.replace(context, **{field: None}))
            except MissingContext as missing:
                assert field in str(missing)
        else:
            with pytest.raises(TypeError, match=f"{name} reads {field} without declaring"):
                context.require(field, by=attack)


@pytest.mark.parametrize("name", attack_cases())
def test_its_reconstruction_has_the_image_shape_and_stays_in_the_box(name, tiny_cut, reconstructed):
    _, _, rec = reconstructed(name)
    assert rec.images.shape == (len(tiny_cut.features), *tiny_cut.data.shape)
    assert torch.isfinite(rec.images).all()
    assert 0.0 <= float(rec.images.min()) and float(rec.images.max()) <= 1.0


@pytest.mark.parametrize("name", attack_cases())
def test_it_records_its_budget_with_the_same_keys(name, tiny_cut, reconstructed):
    """The contract the result rows read: end-to-end iterations and evaluations, block-wise evaluations, seconds."""
    attack, _, rec = reconstructed(name)
    spent = rec.diagnostics["budget"]
    n = len(tiny_cut.features)
    assert tuple(spent) == BUDGET_KEYS
    assert spent["seconds"] > 0 and len(spent["end_to_end_evaluations_per_sample"]) == n
    assert spent["end_to_end_evaluations"] == sum(spent["end_to_end_evaluations_per_sample"]) / n
    assert spent["end_to_end_evaluations"] >= spent["end_to_end_iterations"] >= 0
    assert (spent["blockwise_evaluations"] > 0) == attack.reports_block_errors  # block-wise work, block errors


@pytest.mark.parametrize("name", attack_cases())
def test_the_truth_never_reaches_it(name, tiny_cut):
    attack, context = granted(name, tiny_cut)
    with pytest.raises(TypeError, match="truth"):  # nor does it take it beside the context
        attack.reconstruct(tiny_cut.client, tiny_cut.features, context, truth=tiny_cut.images)


@pytest.mark.parametrize("name", attack_cases())
def test_bad_parameters_are_refused_naming_the_key(name):
    with pytest.raises(ParameterError) as info:
        attacks.get(name, not_a_parameter=1)
    assert info.value.key == "not_a_parameter"
    for key, value in bad_values(attacks.attack_class(name)):
        with pytest.raises(ParameterError) as info:
            attacks.get(name, **{key: value})
        assert info.value.key == key and key in str(info.value), (key, value)


@pytest.mark.parametrize("name", attack_cases())
def test_a_sample_is_reconstructed_as_if_it_were_alone_where_claimed(name, tiny_cut, reconstructed):
    """Sample 1 of three, reconstructed in the batch and alone (tests/attacks/test_batch_independence.py runs the
    same measure on non-injective cuts, defense-aware PEEL, and shows it fails once samples are coupled)."""
    attack, context, _ = reconstructed(name)
    if not claims_batch_independence(type(attack)):
        pytest.skip(f"{name} does not claim batch independence")
    difference, _ = batch_gap(attack, tiny_cut.client, tiny_cut.features, context)
    assert difference < TOLERANCE


def device_stray(attack: attacks.Attack, client, features, context) -> str:
    """'' when the attack makes every tensor on its inputs' device, else the error that shows it did not.

    A CPU-only proxy for a CUDA run: under ``torch.device("meta")`` every factory call without ``device=``
    (``torch.zeros(n)``, a module built inside the attack) lands on the meta device, and the first op that
    meets it with the CPU inputs raises, as a CPU tensor meeting CUDA ones would on a GPU."""
    try:
        with torch.device("meta"):
            attack.reconstruct(client, features, context)
    except (RuntimeError, NotImplementedError) as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize("name", attack_cases())
def test_it_makes_its_tensors_on_the_device_of_its_inputs(name, tiny_cut, reconstructed):
    attack, context, _ = reconstructed(name)
    assert device_stray(attack, tiny_cut.client, tiny_cut.features, context) == ""


def test_the_device_check_catches_a_tensor_made_without_a_device(tiny_cut):
    class Stray(RMLE):
        def reconstruct(self, client, features, context):
            recon = super().reconstruct(client, features, context)
            return dataclasses.replace(recon, images=recon.images + torch.zeros(recon.images.shape[1:]))

    attack = Stray(iterations=2)
    context = AttackContext(image_shape=tiny_cut.data.shape)
    assert attack.reconstruct(tiny_cut.client, tiny_cut.features, context).images.device.type == "cpu"
    assert device_stray(attack, tiny_cut.client, tiny_cut.features, context) != ""


def scrambled(client: torch.nn.Module) -> torch.nn.Module:
    """The client's architecture holding other weights (every float tensor scaled by 1.5 and shifted by 0.01;
    BatchNorm variances stay positive)."""
    other = copy.deepcopy(client)
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1.5).add_(0.01)
    return other


def reads_client_weights(attack: attacks.Attack, client, features, context) -> bool:
    """Whether the reconstruction changes when the client handed to ``reconstruct`` holds other weights (the
    context, built from the real client, is the same: queries still reach the real one)."""
    outputs = []
    for module in (client, scrambled(client)):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            outputs.append(attack.reconstruct(module, features, context).images)
    return not torch.equal(*outputs)


@pytest.mark.parametrize("name", attack_cases())
def test_an_attacker_without_client_weights_never_reads_them(name, tiny_cut):
    """The threat model as an assertion: an attack that does not declare Knowledge.CLIENT_WEIGHTS uses the client
    it is handed for its architecture only (a fresh copy, a shape), never for the values of its weights."""
    attack, context = granted(name, tiny_cut)
    if Knowledge.CLIENT_WEIGHTS in attack.knowledge:
        pytest.skip(f"{name} declares the client's weights")
    assert not reads_client_weights(attack, tiny_cut.client, tiny_cut.features, context)


def test_the_weights_check_catches_an_attack_that_reads_them(tiny_cut):
    """rMLE fits through the client's weights: the check sees it."""
    attack, context = granted("rmle", tiny_cut)
    assert reads_client_weights(attack, tiny_cut.client, tiny_cut.features, context)
