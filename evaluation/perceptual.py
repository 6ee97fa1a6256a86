"""LPIPS from torchmetrics with the backbone's weights read from a local file, never downloaded.

torchmetrics ships LPIPS's linear layers but fetches the ImageNet backbone (AlexNet, VGG-16 or
SqueezeNet 1.1 from torchvision) from the network. Here the backbone is built untrained and filled from
the torchvision state dict the user names (``evaluation.lpips_weights``); without one, LPIPS is not
computed and the results say so (``LPIPS_UNAVAILABLE``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from leakbench.splitnn.errors import ParameterError, check_choice

#: LPIPS's backbone names and the torchvision models whose state dicts they read.
BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
#: Why the ``lpips`` column is empty when no weights were given.
LPIPS_UNAVAILABLE = ("LPIPS not computed: it needs its backbone's ImageNet weights, which leakbench never "
                     "downloads; give a local torchvision state dict as evaluation.lpips_weights")


def _backbone_features(net: str, weights: Path) -> nn.Sequential:
    """The torchvision backbone's ``features`` with the weights from ``weights`` (a whole-model or
    features-only state dict)."""
    import torchvision

    model = getattr(torchvision.models, BACKBONES[net])(weights=None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ParameterError("lpips_weights", str(weights), f"a readable file ({exc.strerror or exc})") from None
    except Exception as exc:  # torch raises several kinds (UnpicklingError, RuntimeError) for a file it can't read
        raise ParameterError("lpips_weights", str(weights),
                             f"a torchvision state dict saved by torch.save ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ParameterError("lpips_weights", str(weights), "a torchvision state dict (a mapping of tensors)")
    features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        model.features.load_state_dict(features, strict=True)
    except RuntimeError as exc:
        raise ParameterError("lpips_weights", str(weights),
                             f"the state dict of torchvision's {BACKBONES[net]} ({str(exc).splitlines()[0]})") from None
    return model.features


def _slices(backbone: nn.Module) -> list[nn.Module]:
    """torchmetrics' backbone slices (attributes ``slice1``... or one ModuleList ``slices``)."""
    slices: list[nn.Module] = []
    for child in backbone.children():
        slices.extend(child if isinstance(child, nn.ModuleList) else [child])
    return slices


class LPIPS:
    """Per-image LPIPS (lower = more similar) on [0, 1] images, with a locally loaded backbone."""

    def __init__(self, weights: str | Path, net: str = "alex", device: str | torch.device = "cpu"):
        check_choice("lpips_net", net, tuple(BACKBONES))
        weights = Path(weights)
        if not weights.is_file():
            raise ParameterError("lpips_weights", str(weights), "an existing file (a torchvision state dict)")
        # torchmetrics' LPIPS module: its shipped linear layers, an untrained backbone (pnet_rand: no download),
        # then the backbone layers replaced by the user's weights, slice by slice (slices keep the indices).
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        self.net = _NoTrainLpips(net=net, pnet_rand=True)  # type: ignore[arg-type]  # checked against BACKBONES
        features = _backbone_features(net, weights)
        for slice_ in _slices(self.net.net):
            for index, module in slice_.named_children():
                module.load_state_dict(features[int(index)].state_dict())
        self.net.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, reconstruction: torch.Tensor, truth: torch.Tensor) -> list[float]:
        """LPIPS of each reconstructed image against its original (grey images are repeated to RGB)."""
        rec = reconstruction.detach().to(self.device).float().clamp(0, 1)
        ref = truth.detach().to(self.device).float().clamp(0, 1)
        if rec.shape[1] == 1:
            rec, ref = rec.repeat(1, 3, 1, 1), ref.repeat(1, 3, 1, 1)
        return [float(v) for v in self.net(rec, ref, normalize=True).flatten()]
