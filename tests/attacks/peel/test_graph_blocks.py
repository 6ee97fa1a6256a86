"""PEEL on residual networks written as the user's own classes: blocks are recognised by structure in the traced
graph (attacks/peel/graph.py), with functional or module ReLUs, ``+`` or ``torch.add``, and shortcuts that are the
user's own modules; anything else is refused naming the op and the node."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks import AttackContext
from leakbench.attacks.peel import PEEL, UnsupportedLayerError, extract_stages
from leakbench.attacks.peel.graph import GraphBlock, segments
from leakbench.splitnn import split
from leakbench.splitnn.split import max_split_error


class Shortcut(nn.Module):
    """A user's own shortcut module: a strided 1x1 convolution."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return self.conv(x)


class UserBlock(nn.Module):
    """The authors' block in the user's own words: no BatchNorm, ``torch.relu`` inside ``forward``."""

    def __init__(self, cin, cout, stride=1, relu="torch", add="plus", post_relu=False, norm=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.relu, self.add, self.post_relu = relu, add, post_relu
        self.shortcut = Shortcut(cin, cout, stride) if stride != 1 or cin != cout else None
        self.act = nn.ReLU()

    def _relu(self, x):
        return {"torch": torch.relu, "functional": F.relu, "module": self.act, "method": lambda v: v.relu()}[
            self.relu](x)

    def forward(self, x):
        out = self.bn2(self.conv2(self._relu(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        out = out + skip if self.add == "plus" else torch.add(out, skip)
        return self._relu(out) if self.post_relu else out


class UserNet(nn.Module):
    def __init__(self, **block):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.block1 = UserBlock(8, 8, **block)
        self.block2 = UserBlock(8, 8, **block)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _client(model, cut="block2"):
    model = model.double().eval()
    client, server = split(model, cut)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert max_split_error(model, client, server, x) == 0.0
    return client, x


@pytest.mark.parametrize("relu, add", [("torch", "plus"), ("functional", "torch.add"), ("module", "plus"),
                                       ("method", "torch.add")])
def test_user_blocks_are_found_by_structure_and_reproduce_the_client(relu, add):
    client, x = _client(UserNet(relu=relu, add=add, post_relu=True))
    found = segments(client)
    assert [type(s).__name__ for s in found] == ["list", "GraphBlock", "GraphBlock"]
    assert [s.name for s in found[1:]] == ["block1", "block2"]
    assert all(isinstance(s, GraphBlock) and s.post_relu is not None and not s.shortcut for s in found[1:])
    stages = extract_stages(client, (3, 8, 8))  # checks that the stages reproduce the client
    assert [s.kind for s in stages] == ["layers", "block", "block"]
    assert all(s.post_relu and s.shortcut_kind == "identity" for s in stages[1:])


def test_a_user_block_in_the_authors_setting_is_inverted_exactly():
    torch.manual_seed(0)
    client, x = _client(UserNet(relu="torch", post_relu=False))
    with torch.no_grad():
        features = client(x)
    rec = PEEL(tv_weight=0.0).reconstruct(client, features, AttackContext(image_shape=(3, 8, 8)))
    assert float(((rec.images.double() - x) ** 2).mean()) < 1e-8


def test_a_users_shortcut_module_and_folded_batchnorm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 1, 1)
            self.down = UserBlock(8, 16, stride=2, relu="functional", post_relu=True, norm=True)

        def forward(self, x):
            return self.down(self.stem(x))

    model = Net()
    for bn in (model.down.bn1, model.down.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    client, x = _client(model, "down")
    stages = extract_stages(client, (3, 8, 8))
    assert stages[1].shortcut_kind == "conv" and stages[1].name == "down" and len(stages[1].layers) == 2


class Odd(nn.Module):
    """conv1, then one of several graphs PEEL cannot read, then conv4 (the cut)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv1, self.conv2, self.conv3, self.conv4 = (nn.Conv2d(3 if i == 0 else 4, 4, 3, 1, 1) for i in range(4))

    def forward(self, x):
        a = self.conv1(x)
        if self.kind == "tanh":
            return self.conv4(torch.tanh(a))
        if self.kind == "three uses":
            return self.conv4(self.conv2(a) + self.conv3(a) + a)
        if self.kind == "scaled add":
            return self.conv4(torch.add(self.conv2(a), a, alpha=2))
        return self.conv4(self.conv2(a) * a)  # a product, not a sum


@pytest.mark.parametrize("kind, message", [
    ("tanh", "unsupported op tanh at node tanh"),
    ("three uses", "at node conv1: its value is used 3 times"),
    ("scaled add", "unsupported op add at node add"),
    ("product", "unsupported op mul at node mul"),
])
def test_anything_else_is_refused_naming_the_op_and_the_node(kind, message):
    client, _ = split(Odd(kind).double().eval(), "conv4")
    with pytest.raises(UnsupportedLayerError, match=message):
        extract_stages(client, (3, 8, 8))
    ok, reason = PEEL().supports(client)
    assert not ok and message.split(" at ")[0] in reason
