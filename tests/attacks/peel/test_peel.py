import time

import pytest
import torch
import torchvision
from torch import nn

from harness import randomise_batchnorm
from leakbench import attacks
from leakbench.attacks import AttackContext
from leakbench.attacks.peel import PEEL, UnsupportedLayerError, extract_stages, invert_block, stage_input_errors
from leakbench.attacks.peel.chain import chain
from leakbench.splitnn import split, zoo
from leakbench.splitnn.zoo import BasicBlock


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_identity_block_in_the_authors_setting_is_recovered_exactly():
    block = BasicBlock(16, 16, norm="none", post_relu=False).double().eval()
    x = torch.randn(3, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    x_hat, diag = invert_block(block, y)
    assert _rel(x_hat, x) < 1e-4
    assert diag["residual"] < 1e-8


def test_standard_block_recovered_input_reproduces_the_output():
    block = BasicBlock(16, 16).double().eval()
    randomise_batchnorm(block)
    x = torch.relu(torch.randn(3, 16, 16, 16, dtype=torch.float64))
    with torch.no_grad():
        y = block(x)
    x_hat, diag = invert_block(block, y, lower=0.0)
    with torch.no_grad():
        assert _rel(block(x_hat), y) < 1e-3
    assert float(x_hat.min()) >= 0.0  # the ReLU before the block bounds its input
    assert diag["residual"] < 1e-3 and diag["constraint_violation"] < 1e-3


def test_stride2_block_with_conv_shortcut_reproduces_the_output():
    block = BasicBlock(8, 16, stride=2).double().eval()
    randomise_batchnorm(block)
    x = torch.relu(torch.randn(2, 8, 16, 16, dtype=torch.float64))
    with torch.no_grad():
        y = block(x)
    x_hat, _ = invert_block(block, y, input_shape=(8, 16, 16), lower=0.0)
    assert x_hat.shape == x.shape
    with torch.no_grad():
        assert _rel(block(x_hat), y) < 1e-3


def test_stages_reproduce_the_client_with_batchnorm_folded():
    model = zoo.get("resnet20").eval()
    randomise_batchnorm(model)
    client, _ = split(model, "layer2")
    stages = extract_stages(client, (3, 32, 32))
    assert [s.kind for s in stages] == ["layers"] + ["block"] * 6
    assert stages[4].shortcut_kind == "conv" and stages[1].shortcut_kind == "identity"  # layer2.0 downsamples


@pytest.mark.parametrize("name, size", [("resnet18", 224), ("resnet50", 224), ("ir50", 112)])
def test_the_zoo_imagenet_and_face_backbones_split_into_stages_at_full_size(name, size):
    """The ImageNet-stem ResNets at 224x224 and IR-50 at 112x112: PEEL supports the cut after layer1 and its
    stages (BatchNorm folded) reproduce the client's features."""
    model = zoo.get(name, num_classes=10).eval()
    randomise_batchnorm(model)
    client, _ = split(model, "layer1")
    assert PEEL().supports(client) == (True, "")
    stages = extract_stages(client, (3, size, size), torch.float32)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        assert _rel(chain(stages)(x), client(x)) < 1e-4


def test_peel_inverts_an_authors_setting_client_to_the_image():
    model = zoo.get("resnet20", norm="none", post_relu=False).eval()
    client, _ = split(model, "layer1.1")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        features = client(x)
    rec = attacks.get("peel", tv_weight=0.0).reconstruct(
        client, features, AttackContext(image_shape=(3, 16, 16)))  # exact: no prior
    assert rec.images.shape == x.shape
    assert float(((rec.images - x) ** 2).mean()) < 1e-6
    assert len(rec.diagnostics["stages"]) == 3 and len(rec.intermediates) == 3
    assert all(e < 1e-3 for e in stage_input_errors(client, (3, 16, 16), rec.intermediates, x))


def test_peel_on_torchvision_resnet_recovers_the_image_where_the_cut_is_invertible():
    model = torchvision.models.resnet18(num_classes=10).eval()
    randomise_batchnorm(model)
    x = torch.rand(2, 3, 32, 32)
    stem, _ = split(model, "relu")  # 7x7/2 conv + BN + ReLU: 16384 outputs, about half non-zero, for 3072 pixels
    with torch.no_grad():
        features = stem(x)
    rec = PEEL(max_iter=50, refine_iter=100, tv_weight=0.0).reconstruct(
        stem, features, AttackContext(image_shape=(3, 32, 32)))
    assert float(((rec.images - x) ** 2).mean()) < 1e-8
    # Behind the max-pool the cut is not injective: PEEL's images still reproduce what was observed.
    client, _ = split(model, "layer1.0")
    with torch.no_grad():
        features = client(x)
    rec = PEEL(max_iter=50, refine_iter=100, tv_weight=0.0).reconstruct(
        client, features, AttackContext(image_shape=(3, 32, 32)))
    assert 0.0 <= float(rec.images.min()) and float(rec.images.max()) <= 1.0
    assert rec.diagnostics["refined_residual"] < 0.5 * rec.diagnostics["blockwise_residual"]


def test_the_truth_never_reaches_an_attack():
    """The context has no field that could carry it; that no attack takes it beside the context is the contract
    suite's (tests/contracts/test_attack_contracts.py)."""
    with pytest.raises(TypeError, match="truth"):
        AttackContext(image_shape=(3, 8, 8), truth=torch.rand(1, 3, 8, 8))


def test_unsupported_layer_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.act = nn.Tanh()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv1(x)).mean((2, 3)))

    client, _ = split(Odd(), "act")
    ok, reason = PEEL().supports(client)
    assert not ok and "Tanh" in reason and "act" in reason
    with pytest.raises(UnsupportedLayerError, match="unsupported op Tanh at node act"):
        extract_stages(client, (3, 8, 8))


def test_bottleneck_blocks_are_inverted():
    from leakbench.splitnn.zoo import Bottleneck

    authors = Bottleneck(16, 4, norm="none", post_relu=False).double().eval()  # 16 -> 16 channels, identity
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = authors(x)
    x_hat, _ = invert_block(authors, y)
    assert _rel(x_hat, x) < 1e-6

    standard = Bottleneck(16, 8).double().eval()  # 16 -> 32 channels: 1x1 conv shortcut, BN, post-ReLU
    randomise_batchnorm(standard)
    x = torch.relu(torch.randn(2, 16, 8, 8, dtype=torch.float64))
    with torch.no_grad():
        y = standard(x)
    x_hat, _ = invert_block(standard, y, lower=0.0, max_iter=2000)
    with torch.no_grad():
        assert _rel(standard(x_hat), y) < 1e-6


def test_torchvision_bottleneck_client_is_supported():
    model = torchvision.models.resnet50(num_classes=10).eval()
    client, _ = split(model, "layer1.0")
    stages = extract_stages(client, (3, 32, 32))
    assert stages[-1].kind == "block" and len(stages[-1].layers) == 3


def test_authors_resnet18_deepest_first_stage_cut_gives_the_image_back():
    model = zoo.get("peel_resnet18", stem="small", width=16).eval()
    client, _ = split(model, "layer1")
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    client = client.double()
    with torch.no_grad():
        features = client(x)
    rec = PEEL(refine=False).reconstruct(client, features, AttackContext(image_shape=(3, 16, 16)))
    mse = float(((rec.images - x) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(1.0 / mse)) >= 60  # PSNR in dB
    errors = stage_input_errors(client, (3, 16, 16), rec.intermediates, x)
    assert all(e <= 1e-6 for e in errors[1:])  # identity blocks


def test_paper_solver_and_default_solver_on_an_authors_block():
    model = zoo.get("resnet20", norm="none", post_relu=False).eval()
    client, _ = split(model, "layer1.0")
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        features = client(x)
    paper = PEEL(solver="paper", refine=False).reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    default = PEEL(refine=False).reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert paper.diagnostics["stages"][-1]["adam_iterations"] == 1000
    assert paper.diagnostics["budget"]["blockwise_evaluations"] == 2000  # Adam: one evaluation a step, 2 stages
    paper_error = stage_input_errors(client, (3, 8, 8), paper.intermediates, x)[-1]
    default_error = stage_input_errors(client, (3, 8, 8), default.intermediates, x)[-1]
    assert paper_error < 0.5  # it does invert, coarsely
    assert default_error <= paper_error


def test_refinement_keeps_the_better_start_per_sample_and_reports_its_budget():
    model = zoo.get("resnet20").eval()
    randomise_batchnorm(model)
    client, _ = split(model, "layer1.0")
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        features = client(x)
    rec = PEEL(max_iter=30, refine_iter=30, tv_weight=0.0).reconstruct(
        client, features, AttackContext(image_shape=(3, 8, 8)))
    d = rec.diagnostics
    assert {"blockwise_residual", "refined_residual", "refine_start", "budget"} <= set(d)
    assert d["refined_residual"] <= d["blockwise_residual"]
    # Per sample the better-matching fit is kept, so the result matches at least as well as either fit.
    assert len(d["refine_start"]) == 2 and set(d["refine_start"]) <= {"blockwise", "grey"}
    assert d["refined_residual"] <= min(d["refine_residuals"].values()) * (1 + 1e-9)
    spent = d["budget"]
    assert 30 < spent["end_to_end_evaluations"] <= 2 * (30 * 31 + 1)  # two starts of <= 30 iterations each
    assert spent["end_to_end_evaluations"] >= spent["end_to_end_iterations"] > 0
    assert spent["blockwise_evaluations"] > 0 and spent["seconds"] > 0
    capped = PEEL(max_iter=30, refine_iter=30, tv_weight=0.0, max_evaluations=10).reconstruct(
        client, features, AttackContext(image_shape=(3, 8, 8)))
    assert capped.diagnostics["budget"]["end_to_end_evaluations_per_sample"] == [10, 10]  # 5 per start
    assert capped.diagnostics["refined_residual"] > d["refined_residual"]
    # The block-wise image is the refinement's first start; the truth scores it afterwards.
    assert torch.equal(rec.alternatives["blockwise"], rec.intermediates[0].clamp(0, 1).float())


@pytest.mark.parametrize("in_planes, planes, stride, kind", [
    (8, 8, 1, "identity"), (8, 8, 2, "subsample"), (8, 16, 2, "conv")])
def test_ir_blocks_with_prelu_are_inverted(in_planes, planes, stride, kind):
    from leakbench.splitnn.zoo import IRBlock

    block = IRBlock(in_planes, planes, stride).double().eval()
    randomise_batchnorm(block)
    x = torch.randn(2, in_planes, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    x_hat, diag = invert_block(block, y, input_shape=(in_planes, 8, 8), max_iter=1000)
    assert kind in diag["kind"]
    with torch.no_grad():
        assert _rel(block(x_hat), y) < 1e-6
    if kind == "identity":  # injective here: the input itself comes back
        assert _rel(x_hat, x) < 1e-6


def test_ir_network_splits_exactly_and_peel_supports_it():
    model = zoo.get("ir18", width=8).eval()
    randomise_batchnorm(model)
    client, server = split(model, "layer2")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(server(client(x)), model(x))
    assert PEEL().supports(client)[0]
    extract_stages(client, (3, 16, 16))  # reproduces the client, PReLU stem included


def test_groupnorm_model_from_opacus_is_handled():
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(zoo.get("resnet20")).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    client, _ = split(model, "layer2.0")
    stages = extract_stages(client, (3, 16, 16))  # reproduces the client: GroupNorm kept as the nonlinear op it is
    assert stages[-1].shortcut_kind == "other"  # 1x1 conv + GroupNorm shortcut
    block = model.layer2[0].double()
    x = torch.relu(torch.randn(2, 16, 16, 16, dtype=torch.float64))
    with torch.no_grad():
        y = block(x)
    x_hat, _ = invert_block(block, y, input_shape=(16, 16, 16), lower=0.0, max_iter=500)
    with torch.no_grad():
        assert _rel(block(x_hat), y) < 1e-3


def test_peel_can_start_from_the_logits():
    model = zoo.get("resnet20").eval()
    randomise_batchnorm(model)
    client, _ = split(model, "fc")
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        logits = client(x)
    assert logits.shape == (2, 10)
    rec = PEEL(max_iter=20, refine_iter=50, also_from_grey=False, tv_weight=0.0).reconstruct(
        client, logits, AttackContext(image_shape=(3, 8, 8)))
    assert rec.images.shape == x.shape and torch.isfinite(rec.images).all()
    assert rec.diagnostics["stages"][-1]["kind"] == "layers"  # avgpool + flatten + linear head
    assert rec.diagnostics["refined_residual"] < 1e-3  # the logits are matched (many images do)


@pytest.mark.parametrize("block_type", [BasicBlock, zoo.Bottleneck])
def test_prelu_branch_blocks_are_inverted_exactly(block_type):
    torch.manual_seed(0)
    block = block_type(16, 16 // block_type.expansion, norm="none", post_relu=False, activation="prelu")
    for p in block.parameters():  # PEEL reads the learned slopes, so give them non-default values
        if p.dim() == 1 and p.numel() == 16 // block_type.expansion:
            p.data.uniform_(0.05, 0.5)
    block = block.double().eval()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    x_hat, diag = invert_block(block, y)
    assert _rel(x_hat, x) < 1e-6 and diag["residual"] < 1e-8


def test_the_paper_solver_uses_the_prelu_slope(monkeypatch):
    from leakbench.attacks.peel import paper_solver
    from leakbench.attacks.peel.stages import _block

    torch.manual_seed(0)
    block = BasicBlock(8, 8, norm="none", post_relu=False, activation="prelu")
    block.act.weight.data.fill_(0.5)
    block = block.double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    stage = _block("b", block, torch.float64)
    stage.input_shape = (8, 6, 6)
    _, with_slope = paper_solver.invert_stage_paper(stage, y)
    monkeypatch.setattr(paper_solver, "_negative_slope", lambda act, like: 0.0)  # as if the branch were a ReLU
    _, without = paper_solver.invert_stage_paper(stage, y)
    assert with_slope["residual"] < 0.5 * without["residual"]


def test_prelu_resnet_splits_exactly_and_its_stages_reproduce_the_client():
    torch.manual_seed(0)
    model = zoo.get("resnet20", activation="prelu", maxpool=True).eval()
    assert isinstance(model.relu, nn.PReLU) and isinstance(model.layer1[0].act, nn.PReLU)
    x = torch.rand(2, 3, 16, 16)
    client, server = split(model, "layer1")
    assert torch.equal(server(client(x)), model(x))
    assert PEEL().supports(client)[0]
    stages = extract_stages(client, (3, 16, 16), check=False)
    with torch.no_grad():
        assert _rel(chain(stages)(x.double()), client.double()(x.double())) < 1e-10


def test_budget_parameters_are_validated_and_the_time_cap_is_kept(monkeypatch):
    from leakbench.splitnn.errors import ParameterError

    for params, key in [({"max_evaluations": 1}, "max_evaluations"), ({"max_evaluations": 10 ** 9}, "max_evaluations"),
                        ({"max_seconds": 0}, "max_seconds"), ({"max_seconds": 1e9}, "max_seconds"),
                        ({"chaining": "oracle_reset"}, "chaining")]:  # the oracle mode is gone: it needed the truth
        with pytest.raises((ParameterError, TypeError), match=key):
            attacks.get("peel", **params)
    assert PEEL(also_from_grey=False, max_evaluations=1).max_evaluations == 1
    model = zoo.get("resnet20", norm="none", post_relu=False).eval()
    client, _ = split(model, "layer1.0")
    with torch.no_grad():
        features = client(torch.rand(2, 3, 8, 8))
    clock = iter(range(10 ** 9))  # 10 ms per reading of the clock, whatever the machine's speed
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 0.01)
    rec = PEEL(refine_iter=10 ** 5, max_seconds=1.0).reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert rec.diagnostics["budget"]["seconds"] <= 1.1 and rec.diagnostics["budget"]["end_to_end_evaluations"] < 100


def test_peel_ticks_a_bar_per_stage_only_when_progress_is_on(monkeypatch):
    """The block-wise stage shows one tick per stage inside attack_progress(True), nothing outside it."""
    import io

    import tqdm.auto

    from leakbench.splitnn.progress import attack_progress

    out, bars = io.StringIO(), []
    real = tqdm.auto.tqdm
    monkeypatch.setattr("leakbench.splitnn.progress.tqdm",
                        lambda *a, **k: bars.append(real(*a, file=out, **k)) or bars[-1])
    client, _ = split(zoo.get("resnet20", norm="none", post_relu=False).eval(), "layer1.0")
    with torch.no_grad():
        features = client(torch.rand(1, 3, 8, 8))
    peel = attacks.get("peel", refine=False)
    peel.reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert out.getvalue() == ""
    with attack_progress(True):
        peel.reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert "PEEL stages" in out.getvalue()
    shown = [bar for bar in bars if getattr(bar, "desc", None) == "PEEL stages"]  # a hidden bar has no desc
    assert [bar.n for bar in shown] == [2]  # one tick per stage of the client's two (stem, block)
