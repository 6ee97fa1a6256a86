import pytest
import torch
import torchvision
from torch import nn

from leakbench.splitnn import ParameterError, SplitModel, split, valid_cuts, zoo


def _assert_exact(model, cut, x):
    model.eval()
    client, server = split(model, cut)
    with torch.no_grad():
        assert torch.equal(server(client(x)), model(x))
    return client, server


@pytest.mark.parametrize("cut", ["relu", "layer1", "layer1.2", "layer2.0", "layer2", "layer3"])
def test_resnet20_split_is_exact(cut):
    _assert_exact(zoo.get("resnet20"), cut, torch.rand(3, 3, 32, 32))


@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_resnet18_split_is_exact_for_both_stems(stem):
    _assert_exact(zoo.get("resnet18", stem=stem), "layer2.1", torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_torchvision_resnets_split_exactly(builder):
    client, _ = _assert_exact(builder(num_classes=10), "layer2", torch.rand(2, 3, 64, 64))
    # the client keeps the original block objects, so attacks can introspect them
    assert isinstance(client.get_submodule("layer2.0"), (torchvision.models.resnet.BasicBlock,
                                                          torchvision.models.resnet.Bottleneck))


def test_users_own_module_splits_by_child_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.pool(self.features(x)).flatten(1))

    client, server = _assert_exact(Net(), "features", torch.rand(2, 3, 16, 16))
    assert client(torch.rand(1, 3, 16, 16)).shape == (1, 8, 16, 16)


def test_unknown_cut_names_the_valid_ones():
    with pytest.raises(ParameterError, match="valid cuts: .*layer1"):
        split(zoo.get("resnet20"), "layer9")


def test_cut_inside_a_block_is_rejected():
    with pytest.raises(ParameterError, match="cut"):
        split(zoo.get("resnet20"), "layer1.0.conv1")
    assert "layer1.0.conv1" not in valid_cuts(zoo.get("resnet20"))


def test_split_model_applies_the_defense_between_halves():
    model = zoo.get("resnet20").eval()
    client, server = split(model, "layer1")
    x = torch.rand(2, 3, 32, 32)
    zeroed = SplitModel(client, server, defense=torch.zeros_like)
    with torch.no_grad():
        assert torch.equal(zeroed(x), server(torch.zeros_like(client(x))))
        assert torch.equal(SplitModel(client, server)(x), model(x))


def test_zoo_has_no_inplace_ops():
    for name in zoo.names():
        for module in zoo.get(name).modules():
            assert not getattr(module, "inplace", False), f"{name}: {module} is in-place"
