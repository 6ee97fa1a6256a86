"""The client half as a chain of invertible stages: layer groups (e.g. the stem) and residual blocks, the
latter kept as one module by the tracer (ours, torchvision's) or found by structure in the graph (``graph``).

BatchNorm is folded into the preceding convolution (eval-mode statistics), so each stage is
written in the paper's terms: a block computes ``y = S(x) + W2·ReLU(W1·x)`` (then ReLU when the
block has one after the addition), with ``S`` the identity or a 1x1 strided convolution.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
from torch import fx, nn

from leakbench.attacks.peel import graph
from leakbench.splitnn import zoo
from leakbench.splitnn.split import BLOCK_TYPES


class UnsupportedLayerError(ValueError):
    """The client half contains an operation PEEL has no inverse for."""


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype) -> nn.Conv2d:
    """A copy of ``conv`` (in ``dtype``) that computes ``bn(conv(x))`` with ``bn``'s eval-mode statistics."""
    folded = copy.deepcopy(conv).to(dtype)
    weight = folded.weight.detach()
    bias = folded.bias.detach() if folded.bias is not None else torch.zeros(weight.shape[0], dtype=dtype,
                                                                              device=weight.device)
    if bn is not None:
        assert bn.running_mean is not None and bn.running_var is not None  # the statistics it folds in
        scale = bn.weight.detach().to(dtype) / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = (bias - bn.running_mean.to(dtype)) * scale + bn.bias.detach().to(dtype)
    folded.weight = nn.Parameter(weight, requires_grad=False)
    folded.bias = nn.Parameter(bias, requires_grad=False)
    return folded


def _frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    module = copy.deepcopy(module).to(dtype).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass
class Stage:
    """One invertible piece of the client: ``forward`` maps its input to its output."""

    name: str
    kind: str                      # "layers" or "block"
    forward: Callable[[torch.Tensor], torch.Tensor]
    output_nonnegative: bool       # its output is >= 0 (ends in a ReLU), which bounds the next stage's input
    #: ``forward`` without its final ReLU, when the stage ends in one (lets solvers treat zeros as constraints)
    pre_relu: Callable[[torch.Tensor], torch.Tensor] | None = None
    input_shape: tuple[int, ...] = ()
    # Blocks only: the residual branch W_k·a(... a(W_1·x)) as its affine layers (BatchNorm folded in;
    # a GroupNorm or a leading BatchNorm kept as a module) and the activations between them
    # (ReLU or PReLU), the shortcut (None = identity) and the ReLU after the addition.
    residual: Callable[[torch.Tensor], torch.Tensor] | None = None
    layers: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    activations: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    shortcut: Callable[[torch.Tensor], torch.Tensor] | None = None
    shortcut_kind: str = "identity"    # identity | conv (a plain 1x1 conv) | subsample | other
    post_relu: bool = False
    description: list[str] = field(default_factory=list)

    @property
    def identity_shortcut(self) -> bool:
        return self.kind == "block" and self.shortcut is None


# ---------------------------------------------------------------- layer groups (stem, head, ...)

_ELEMENTWISE_NONNEG = (nn.ReLU,)
_SHAPE_ONLY = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten, nn.Dropout)


def _layer_group(name: str, items: list[tuple[str, nn.Module | None, object]], dtype: torch.dtype) -> Stage:
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    description: list[str] = []
    nonneg = False
    i = 0
    while i < len(items):
        item_name, module, node = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(module, nn.Conv2d):
            bn = nxt if isinstance(nxt, nn.BatchNorm2d) else None
            ops.append(fold_conv_bn(module, bn, dtype))
            description.append(item_name + ("+" + items[i + 1][0] if bn is not None else ""))
            i += 2 if bn is not None else 1
            nonneg = False
            continue
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):  # GroupNorm: per sample, not foldable
            ops.append(_frozen(module, dtype))
            nonneg = False
        elif isinstance(module, _ELEMENTWISE_NONNEG) or graph.is_relu(cast(fx.Node, node), module):
            ops.append(torch.relu)
            nonneg = True
        elif isinstance(module, (nn.PReLU, nn.Linear)):
            ops.append(_frozen(module, dtype))
            nonneg = False
        elif isinstance(module, _SHAPE_ONLY):
            ops.append(_frozen(module, dtype))  # keeps the sign: a pool of non-negatives is non-negative
        elif module is None and getattr(node, "target", None) in (torch.flatten,):
            args: tuple[Any, ...] = getattr(node, "args", ())
            start_dim = args[1] if len(args) > 1 else 1
            ops.append(functools.partial(torch.flatten, start_dim=start_dim))
        else:
            what = graph.op_name(cast(fx.Node, node), module)
            raise UnsupportedLayerError(f"unsupported op {what} at node {item_name}: PEEL inverts convolutions, "
                                        "BatchNorm, ReLU/PReLU, pooling, linear layers and residual blocks")
        description.append(item_name)
        i += 1

    def run(x: torch.Tensor, chain: list[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        for op in chain:
            x = op(x)
        return x

    ends_in_relu = bool(ops) and ops[-1] is torch.relu
    pre_relu = (lambda x: run(x, ops[:-1])) if ends_in_relu else None
    return Stage(name, "layers", lambda x: run(x, ops), nonneg, pre_relu=pre_relu, description=description)


# ---------------------------------------------------------------- residual blocks

def _affine(conv: nn.Conv2d, norm: nn.Module | None, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """conv followed by its norm: BatchNorm is folded in; GroupNorm (per-sample, so not foldable) stays a module."""
    if norm is None or isinstance(norm, nn.BatchNorm2d):
        return fold_conv_bn(conv, norm, dtype)
    if isinstance(norm, nn.GroupNorm):
        return nn.Sequential(_frozen(conv, dtype), _frozen(norm, dtype))
    raise UnsupportedLayerError(f"unsupported layer {type(norm).__name__} after a convolution")


def _branch(block: nn.Module, dtype: torch.dtype) -> tuple[list, list, bool]:
    """(layers, activations, post_relu) of a supported block's residual branch."""
    def act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:  # a zoo block's PReLU, else ReLU
        module = getattr(block, name, None)
        return torch.relu if module is None else _frozen(module, dtype)

    if isinstance(block, (zoo.BasicBlock, tv_resnet.BasicBlock)):
        layers = [_affine(block.conv1, block.bn1, dtype), _affine(block.conv2, block.bn2, dtype)]
        return layers, [act("act")], getattr(block, "post_relu", True)
    if isinstance(block, (zoo.Bottleneck, tv_resnet.Bottleneck)):
        layers = [_affine(block.conv1, block.bn1, dtype), _affine(block.conv2, block.bn2, dtype),
                  _affine(block.conv3, block.bn3, dtype)]
        return layers, [act("act1"), act("act2")], getattr(block, "post_relu", True)
    if isinstance(block, zoo.IRBlock):
        first = _frozen(block.conv1, dtype) if block.bn0 is None else \
            nn.Sequential(_frozen(block.bn0, dtype), _frozen(block.conv1, dtype))  # BN before a padded conv: kept
        return [first, _affine(block.conv2, block.bn2, dtype)], [_frozen(block.prelu, dtype)], block.post_relu
    raise UnsupportedLayerError(f"unsupported layer {type(block).__name__}")


def _shortcut(name: str, downsample: nn.Module | None, dtype: torch.dtype
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    if downsample is None:
        return None, "identity"
    if isinstance(downsample, nn.MaxPool2d) and downsample.kernel_size in (1, (1, 1)):
        return _frozen(downsample, dtype), "subsample"
    parts = list(downsample) if isinstance(downsample, nn.Sequential) else [downsample]
    if isinstance(parts[0], nn.Conv2d) and parts[0].kernel_size == (1, 1) and len(parts) <= 2:
        norm = parts[1] if len(parts) == 2 else None
        shortcut = _affine(parts[0], norm, dtype)
        return shortcut, "conv" if isinstance(shortcut, nn.Conv2d) else "other"
    raise UnsupportedLayerError(f"unsupported layer {downsample} at {name}.downsample: expected a 1x1 "
                                "convolution (with BatchNorm or GroupNorm) or a subsampling MaxPool2d(1, stride)")


def _block(name: str, block: nn.Module, dtype: torch.dtype) -> Stage:
    try:
        layers, activations, post_relu = _branch(block, dtype)
    except UnsupportedLayerError as exc:
        raise UnsupportedLayerError(f"{exc} at {name}") from None
    shortcut, shortcut_kind = _shortcut(name, cast("nn.Module | None", block.downsample), dtype)
    return _block_stage(name, type(block).__name__, layers, activations, shortcut, shortcut_kind, post_relu)


def _graph_branch(block: graph.GraphBlock, dtype: torch.dtype) -> tuple[list, list]:
    """(layers, activations) of a branch found by structure: conv [norm] (activation conv [norm])*."""
    layers: list[Callable[[torch.Tensor], torch.Tensor]] = []
    activations: list[Callable[[torch.Tensor], torch.Tensor]] = []
    items = [item for item in block.branch if not isinstance(item[1], nn.Identity)]
    i = 0
    while i < len(items):
        name, module, node = items[i]
        norm = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(module, nn.Conv2d) and len(layers) == len(activations):
            paired = isinstance(norm, (nn.BatchNorm2d, nn.GroupNorm))
            layers.append(_affine(module, norm if paired else None, dtype))
            i += 2 if paired else 1
            continue
        if (graph.is_relu(node, module) or isinstance(module, nn.PReLU)) and len(layers) == len(activations) + 1:
            activations.append(torch.relu if module is None or isinstance(module, nn.ReLU) else _frozen(module, dtype))
            i += 1
            continue
        raise UnsupportedLayerError(f"unsupported op {graph.op_name(node, module)} at node {name} in the residual "
                                    f"block {block.name}: PEEL inverts a branch conv [norm] (ReLU/PReLU conv [norm])*")
    if not layers or len(layers) != len(activations) + 1:
        raise UnsupportedLayerError(f"unsupported residual branch in the block {block.name}: it must end in a "
                                    "convolution, with one ReLU/PReLU between convolutions")
    return layers, activations


def _graph_block(block: graph.GraphBlock, dtype: torch.dtype) -> Stage:
    layers, activations = _graph_branch(block, dtype)
    if any(module is None for _, module, _ in block.shortcut):
        name, _, node = next(item for item in block.shortcut if item[1] is None)
        raise UnsupportedLayerError(f"unsupported op {graph.op_name(node)} at node {name} on the shortcut of "
                                    f"the residual block {block.name}")
    modules = [module for _, module, _ in block.shortcut if module is not None]  # all of them (checked above)
    downsample = None if not modules else modules[0] if len(modules) == 1 else nn.Sequential(*modules)
    shortcut, shortcut_kind = _shortcut(block.name, downsample, dtype)
    return _block_stage(block.name, "block", layers, activations, shortcut, shortcut_kind, block.post_relu is not None)


def _block_stage(name: str, label: str, layers: list, activations: list,
                 shortcut: Callable[[torch.Tensor], torch.Tensor] | None, shortcut_kind: str, post_relu: bool
                 ) -> Stage:
    """The stage ``[relu](shortcut(x) + residual(x))`` of a block's parts."""

    def residual(x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(layers[:-1], activations):
            x = act(layer(x))
        return layers[-1](x)

    def pre_activation(x: torch.Tensor) -> torch.Tensor:
        return (x if shortcut is None else shortcut(x)) + residual(x)

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = pre_activation(x)
        return torch.relu(z) if post_relu else z

    kind = f"{label}({shortcut_kind} shortcut{', post-ReLU' if post_relu else ''})"
    return Stage(name, "block", forward, post_relu, pre_relu=pre_activation if post_relu else None,
                 residual=residual, layers=layers, activations=activations, shortcut=shortcut,
                 shortcut_kind=shortcut_kind, post_relu=post_relu, description=[kind])


#: Whatever ``split`` keeps as one node is a block here (``_branch`` says which of them PEEL can invert).
BLOCKS = BLOCK_TYPES


def build_stages(client: nn.Module, dtype: torch.dtype = torch.float64) -> list[Stage]:
    """Split ``client`` (a half from ``splitnn.split``) into stages; raises UnsupportedLayerError."""
    if not hasattr(client, "graph"):
        raise UnsupportedLayerError("PEEL needs a client half made by splitnn.split (a traced module)")
    try:
        found = graph.segments(cast(fx.GraphModule, client))  # a traced module (checked above)
    except graph.GraphError as exc:
        raise UnsupportedLayerError(str(exc)) from None
    stages: list[Stage] = []
    for segment in found:
        if isinstance(segment, graph.LeafBlock):
            stages.append(_block(segment.name, segment.module, dtype))
        elif isinstance(segment, graph.GraphBlock):
            stages.append(_graph_block(segment, dtype))
        else:
            name = segment[0][0] if len(segment) == 1 else f"{segment[0][0]}..{segment[-1][0]}"
            stages.append(_layer_group(name, list(segment), dtype))
    return stages


def extract_stages(client: nn.Module, image_shape: tuple[int, int, int], dtype: torch.dtype = torch.float64,
                   check: bool = True) -> list[Stage]:
    """The stages of ``client`` with each stage's input shape recorded.

    With ``check`` the chain of stages is verified to reproduce ``client`` on a random input,
    which catches blocks whose forward differs from the standard one.
    """
    stages = build_stages(client, dtype)
    device = next(iter(client.parameters()), torch.empty(0, device="cpu")).device
    # the probe is drawn on the CPU (the same on every device), then moved to the client's
    x = torch.rand(2, *image_shape, dtype=dtype, device="cpu", generator=torch.Generator().manual_seed(0)).to(device)
    probe = x
    with torch.no_grad():
        for stage in stages:
            stage.input_shape = tuple(probe.shape[1:])
            probe = stage.forward(probe)
        if check:
            expected = copy.deepcopy(client).eval().to(dtype)(x)
            error = float((probe - expected).norm() / expected.norm().clamp_min(1e-30))
            if error > 1e-6:
                raise UnsupportedLayerError(f"the stages PEEL extracted do not reproduce the client half "
                                            f"(relative error {error:.2e}); a block's forward is non-standard")
    return stages


def _fill_to(sub: torch.Tensor, stride: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour upsampling by ``stride``, padded/cropped to ``shape`` (C, H, W)."""
    full = sub.repeat_interleave(stride, dim=2).repeat_interleave(stride, dim=3)
    c, h, w = shape
    pad = (0, max(0, w - full.shape[3]), 0, max(0, h - full.shape[2]))
    return F.pad(full, pad, mode="replicate")[..., :h, :w]


def shortcut_start(stage: Stage, y: torch.Tensor) -> torch.Tensor:
    """Warm start for a block whose shortcut is not the identity: invert the shortcut alone.

    A strided shortcut only sees every ``stride``-th pixel; the pixels it skips are filled with
    their nearest seen neighbour (a smoothness prior), since the block's output does not pin
    them down on its own. A 1x1 conv shortcut is inverted by least squares; a subsampling one
    copies ``y``; a shortcut with GroupNorm starts from zeros.
    """
    if stage.shortcut_kind == "subsample":
        return _fill_to(y, stage.shortcut.stride if isinstance(stage.shortcut.stride, int)  # type: ignore[union-attr]
                        else stage.shortcut.stride[0], stage.input_shape)  # type: ignore[union-attr]
    if stage.shortcut_kind != "conv":
        return torch.zeros((y.shape[0], *stage.input_shape), dtype=y.dtype, device=y.device)
    conv = stage.shortcut
    assert isinstance(conv, nn.Conv2d)
    weight = conv.weight.detach()[:, :, 0, 0]          # (C_out, C_in)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=y.dtype,
                                                                        device=y.device)
    rhs = (y - bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1)  # (N, h, w, C_out)
    sub = (rhs @ torch.linalg.pinv(weight).T).permute(0, 3, 1, 2)  # (N, C_in, h, w)
    return _fill_to(sub, conv.stride[0], stage.input_shape)
