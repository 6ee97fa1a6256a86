"""Residual networks with explicit, introspectable blocks and no in-place operations (Opacus needs that).

Every model keeps torchvision's layout (``conv1``, ``bn1``, ``relu``, optional ``maxpool``,
``layer1``..``layerN``, ``avgpool``, ``fc``), so cuts are named the same way for our models and
for torchvision's own ``resnet18``/``resnet50`` instances.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import nn

from leakbench.splitnn.errors import ParameterError, check_bool, check_choice, check_number
from leakbench.splitnn.registry import Registry

_registry: Registry[nn.Module] = Registry("model")
NORMS = ("batch", "none")
STEMS = ("small", "imagenet")
ACTIVATIONS = ("relu", "prelu")


def _norm(kind: str, channels: int) -> nn.Module | None:
    return nn.BatchNorm2d(channels) if kind == "batch" else None


def _activation(kind: str, channels: int) -> nn.Module | None:
    """The activation inside a residual branch: None means the block's plain ReLU; "prelu" a per-channel PReLU."""
    return nn.PReLU(channels) if kind == "prelu" else None


def _shortcut_conv(in_planes: int, out_planes: int, stride: int, norm: str) -> nn.Sequential:
    """The projection shortcut: a 1x1 conv (with ``stride``), followed by the norm unless there is none."""
    layers: list[nn.Module] = [nn.Conv2d(in_planes, out_planes, 1, stride, bias=norm == "none")]
    if norm != "none":
        layers.append(nn.BatchNorm2d(out_planes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``shortcut(x) + residual(x)``, then ReLU when ``post_relu``; subclasses define the branch."""

    expansion = 1
    downsample: nn.Module | None
    post_relu: bool
    relu: nn.Module

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x) + self.residual(x)
        return self.relu(out) if self.post_relu else out


class BasicBlock(ResidualBlock):
    """x -> conv3x3-norm-ReLU-conv3x3-norm, plus the shortcut, then ReLU (``post_relu``) or nothing.

    ``post_relu=False`` with ``norm="none"`` is the block the PEEL authors inverted.
    The shortcut is the identity, or a 1x1 conv (+norm) when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batch",
                 post_relu: bool = True, activation: str = "relu"):
        super().__init__()
        use_bias = norm == "none"
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=use_bias)
        self.bn1 = _norm(norm, planes)
        self.relu = nn.ReLU()
        self.act = _activation(activation, planes)  # the branch's PReLU; the ReLU after the addition stays a ReLU
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=use_bias)
        self.bn2 = _norm(norm, planes)
        self.post_relu = post_relu
        self.downsample = _shortcut_conv(in_planes, planes, stride, norm) \
            if stride != 1 or in_planes != planes else None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch W2·ReLU(W1·x), without the shortcut."""
        out = self.conv1(x)
        if self.bn1 is not None:
            out = self.bn1(out)
        out = self.relu(out) if self.act is None else self.act(out)
        out = self.conv2(out)
        if self.bn2 is not None:
            out = self.bn2(out)
        return out

class Bottleneck(ResidualBlock):
    """x -> 1x1 conv-norm-ReLU-3x3 conv (stride)-norm-ReLU-1x1 conv-norm (4x wider), plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batch",
                 post_relu: bool = True, activation: str = "relu"):
        super().__init__()
        use_bias = norm == "none"
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=use_bias)
        self.bn1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=use_bias)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, 1, 0, bias=use_bias)
        self.bn3 = _norm(norm, out_planes)
        self.relu = nn.ReLU()
        self.act1, self.act2 = _activation(activation, planes), _activation(activation, planes)
        self.post_relu = post_relu
        self.downsample = _shortcut_conv(in_planes, out_planes, stride, norm) \
            if stride != 1 or in_planes != out_planes else None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        layers: tuple[tuple[nn.Module, nn.Module | None, nn.Module | None | Literal[False]], ...] = (
            (self.conv1, self.bn1, self.act1), (self.conv2, self.bn2, self.act2), (self.conv3, self.bn3, False))
        for conv, bn, act in layers:
            out = conv(out)
            if bn is not None:
                out = bn(out)
            if act is not False:
                out = self.relu(out) if act is None else act(out)
        return out

class IRBlock(ResidualBlock):
    """The face-recognition IR block: BN-conv3x3-PReLU-conv3x3(stride)-BN, plus the shortcut, no activation after.

    The shortcut is the identity, a subsampling ``MaxPool2d(1, stride)`` when only the
    resolution changes, or a 1x1 conv (+norm) when the width changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batch", post_relu: bool = False):
        super().__init__()
        use_bias = norm == "none"
        self.bn0 = _norm(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=use_bias)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=use_bias)
        self.bn2 = _norm(norm, planes)
        self.post_relu = post_relu
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if in_planes != planes:
            self.downsample = _shortcut_conv(in_planes, planes, stride, norm)
        elif stride != 1:
            self.downsample = nn.MaxPool2d(1, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn0(x) if self.bn0 is not None else x
        out = self.prelu(self.conv1(out))
        out = self.conv2(out)
        return self.bn2(out) if self.bn2 is not None else out

class IRNet(nn.Module):
    """IR-style face backbone: conv3x3-BN-PReLU stem, stages of IRBlocks (each starts with stride 2),
    then BN, global average pool and a linear head."""

    def __init__(self, blocks_per_stage: list[int], width: int = 64, num_classes: int = 10, in_channels: int = 3,
                 norm: str = "batch"):
        super().__init__()
        check_choice("norm", norm, NORMS)
        check_number("width", width, low=1, integer=True)
        check_number("num_classes", num_classes, low=2, integer=True)
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=norm == "none")
        self.bn1 = _norm(norm, width)
        self.prelu = nn.PReLU(width)
        self.stage_names: list[str] = []
        in_planes = width
        for i, (n, w) in enumerate(zip(blocks_per_stage, widths)):
            blocks = [IRBlock(in_planes if j == 0 else w, w, 2 if j == 0 else 1, norm) for j in range(n)]
            in_planes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
        self.bn_out = _norm(norm, in_planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.prelu(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.bn_out is not None:
            x = self.bn_out(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class ResNet(nn.Module):
    """A ResNet with a small-image stem (3x3/1 conv) or an ImageNet stem (7x7/2 conv, max-pool unless
    ``maxpool=False``)."""

    def __init__(self, blocks_per_stage: list[int], widths: list[int], num_classes: int = 10,
                 in_channels: int = 3, stem: str = "small", norm: str = "batch", post_relu: bool = True,
                 block: type[nn.Module] = BasicBlock, maxpool: bool | None = None, activation: str = "relu"):
        super().__init__()
        check_choice("stem", stem, STEMS)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("norm", norm, NORMS)
        check_bool("post_relu", post_relu)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_number("in_channels", in_channels, low=1, integer=True)
        maxpool = (stem == "imagenet") if maxpool is None else check_bool("maxpool", maxpool)
        self.config = dict(stem=stem, norm=norm, post_relu=post_relu, num_classes=num_classes,
                           in_channels=in_channels, maxpool=maxpool, block=block.__name__, activation=activation)
        use_bias = norm == "none"
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=use_bias)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=use_bias)
        self.bn1 = _norm(norm, widths[0])
        self.relu = nn.ReLU() if activation == "relu" else nn.PReLU(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else None
        self.stage_names: list[str] = []
        in_planes = widths[0]
        for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, width, stride if j == 0 else 1, norm, post_relu, activation))
                in_planes = width * getattr(block, "expansion", 1)
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.relu(x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _cifar_resnet(depth: int):
    n = (depth - 2) // 6

    def build(num_classes: int = 10, in_channels: int = 3, stem: str = "small", norm: str = "batch",
              post_relu: bool = True, maxpool: bool = False, activation: str = "relu") -> ResNet:
        return ResNet([n, n, n], [16, 32, 64], num_classes, in_channels, stem, norm, post_relu,
                      maxpool=maxpool, activation=activation)

    build.__doc__ = f"CIFAR-style ResNet-{depth}: 3 stages of {n} BasicBlocks, widths 16/32/64."
    return build


def _imagenet_resnet(blocks: list[int], depth: int, block: type[nn.Module] = BasicBlock, norm_default: str = "batch",
                     post_relu_default: bool = True):
    def build(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet", norm: str = norm_default,
              post_relu: bool = post_relu_default, maxpool: bool | None = None, width: int = 64,
              activation: str = "relu") -> ResNet:
        check_number("width", width, low=1, integer=True)
        return ResNet(blocks, [width, 2 * width, 4 * width, 8 * width], num_classes, in_channels, stem, norm,
                      post_relu, block, maxpool, activation)

    build.__doc__ = f"ResNet-{depth} in torchvision's layout ({block.__name__}s {blocks}, widths 64..512 by default)."
    return build


for _depth in (20, 32, 56):
    _registry.register(f"resnet{_depth}")(_cifar_resnet(_depth))
_registry.register("resnet18")(_imagenet_resnet([2, 2, 2, 2], 18))
_registry.register("resnet34")(_imagenet_resnet([3, 4, 6, 3], 34))
_registry.register("resnet50")(_imagenet_resnet([3, 4, 6, 3], 50, Bottleneck))
# The architecture the PEEL authors inverted: BasicBlock ResNet-18 without BatchNorm and without
# the ReLU after the addition (``maxpool=False`` for their variant without the stem's max-pool).
_registry.register("peel_resnet18")(_imagenet_resnet([2, 2, 2, 2], 18, BasicBlock, "none", False))


def _ir(blocks: list[int], depth: int):
    def build(num_classes: int = 10, in_channels: int = 3, norm: str = "batch", width: int = 64) -> IRNet:
        return IRNet(blocks, width, num_classes, in_channels, norm)

    build.__doc__ = f"IR-{depth} face backbone (IRBlocks {blocks}, PReLU, widths 64..512 by default)."
    return build


_registry.register("ir18")(_ir([2, 2, 2, 2], 18))
_registry.register("ir50")(_ir([3, 4, 14, 3], 50))
_registry.register("ir152")(_ir([3, 8, 36, 3], 152))


def get(name: str, **params: Any) -> nn.Module:
    """Build a model of the zoo by name, e.g. ``zoo.get("resnet20", num_classes=10)``; a name with a colon is a
    torchvision architecture (``torchvision:resnet18``) or the user's factory (``package.module:function``)."""
    from leakbench.splitnn import user_models

    return user_models.factory(name)(**params) if user_models.is_user_model(name) else _registry.get(name, **params)


def names() -> list[str]:
    return _registry.names()


def factory(name: str) -> Callable[..., Any]:
    """The function registered as ``name`` (its signature declares the model's parameters), without calling it."""
    from leakbench.splitnn import user_models

    if user_models.is_user_model(name):
        return user_models.factory(name)
    try:
        return _registry.factory(name)
    except ParameterError as exc:
        raise ParameterError("name", name, f"{exc.expected}; or torchvision:ARCH, or package.module:function "
                                           "(the user's own factory)") from None
