"""What tests in every folder share (``import harness``: pyproject puts tests/ on sys.path): the repository root,
the tiny configs the CLI, runner and fault tests run, the small ResNet-20 on 16x16 digits the attack tests train,
the batch-independence measure, and the bad values a declared signature must refuse. The fixtures built from
these are in tests/conftest.py."""
from __future__ import annotations

import textwrap
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from leakbench.attacks import Attack, AttackContext
from leakbench.splitnn import TrainConfig, datasets, split, train
from leakbench.splitnn.datasets import Dataset
from leakbench.splitnn.params import signature_model
from leakbench.splitnn.training import TrainedModel

#: The repository (tests/harness.py -> ..): the packages, experiments/ and pyproject.toml live there.
ROOT = Path(__file__).resolve().parent.parent
SIZE = 16

#: The tiny two-cell config (ResNet-20 on 16x16 digits, 1 epoch; undefended and noise; rMLE for 5 iterations;
#: 2 images, judged): what the CLI, malformed-config and fault tests start from and edit (``swap``).
TINY_CONFIG = """\
name: tiny
seed: 0
dataset: {name: digits, params: {size: 16}}
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses:
  - none
  - {name: gaussian_noise, params: {scale: 0.1}}
attacks:
  - {name: rmle, params: {iterations: 5}}
evaluation: {num_images: 2}
"""

#: The tiny 4-cell config: none/noise x rMLE/PEEL, 3 images, no judge (the runner and report tests).
FOUR_CELLS = """\
name: tiny
seed: 0
dataset: {name: digits, params: {size: 16}}
model: resnet20
train: {epochs: 1, batch_size: 128}
cut: layer1
defenses:
  - none
  - {name: gaussian_noise, params: {scale: 0.5}}
attacks:
  - {name: rmle, params: {iterations: 10}}
  - {name: peel, params: {max_iter: 5, fixed_point_iters: 5}}
evaluation: {num_images: 3, classifier: false}
"""


#: A config as a mapping, without its model (a test adds one): ``ExperimentConfig({**BASE_MAPPING, "model": ...})``.
BASE_MAPPING = {"dataset": {"name": "digits", "params": {"size": 16}}, "train": {"epochs": 3}, "cut": "layer1",
                "defenses": ["none"], "attacks": [{"name": "rmle", "params": {"iterations": 5}}]}


def swap(text: str, old: str, new: str) -> str:
    """``text`` with its first ``old`` replaced by ``new``; fails when ``old`` is not there (an edit that matched
    nothing would test the unedited config)."""
    assert old in text, old
    return text.replace(old, new, 1)


def without_judge(text: str = TINY_CONFIG) -> str:
    """The config without the evaluation classifier (nothing to train for a test that does not read it)."""
    return swap(text, "{num_images: 2}", "{num_images: 2, classifier: false}")


def write_config(folder: Path, text: str = TINY_CONFIG, name: str = "config.yaml") -> Path:
    """Write a config into ``folder`` (dedented) and return its path."""
    path = Path(folder) / name
    path.write_text(textwrap.dedent(text))
    return path


def digits16() -> Dataset:
    return datasets.get("digits", size=SIZE)


def trained_split(data: Dataset, epochs: int = 4) -> tuple[TrainedModel, nn.Module, nn.Module]:
    """(trained model, client, server) of ResNet-20 split after layer1; the checkpoint cache makes every call after
    the first free."""
    config = TrainConfig("resnet20", "digits", dataset_params=data.params, epochs=epochs, batch_size=64)
    trained = train(config, data=data, progress=False)
    client, server = split(trained.model, "layer1")
    return trained, client.eval(), server.eval()


class SmallSplit(NamedTuple):
    """The small trained split the attack tests share (the root conftest's ``small_split``)."""

    data: Dataset
    trained: TrainedModel
    client: nn.Module
    server: nn.Module


def psnr(images: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean PSNR (dB) of [0, 1] images, per image then averaged."""
    mse = (images - truth).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def randomise_batchnorm(module: nn.Module) -> None:
    """Give BatchNorm layers non-trivial eval statistics, as a trained network has."""
    g = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.data.uniform_(0.5, 1.5, generator=g)
            bn.bias.data.uniform_(-0.2, 0.2, generator=g)


def batch_gap(attack: Attack, client: nn.Module, features: torch.Tensor, context: AttackContext, sample: int = 1
              ) -> tuple[float, torch.Tensor]:
    """(relative difference of ``sample`` reconstructed within the batch and alone, its image within the batch):
    zero up to float reordering for an attack whose samples are independent."""
    together = attack.reconstruct(client, features, context).images[sample:sample + 1]
    alone = attack.reconstruct(client, features[sample:sample + 1], context).images
    return float((together - alone).abs().max() / alone.abs().max()), together


def present_fields(context: AttackContext) -> set[str]:
    """The context's fields that are there (not None)."""
    return {f.name for f in fields(context) if getattr(context, f.name) is not None}


def _constrained(annotation: Any) -> tuple[Any, list[Any]]:
    """(the type, its bounds) of a declared annotation: ``Annotated[int, Field(ge=1)]``, optionally ``| None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return annotation, []
        annotation = members[0]
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, [m for extra in extras for m in getattr(extra, "metadata", [extra])]
    return annotation, []


def bad_values(cls: type) -> list[tuple[str, Any]]:
    """(parameter, value) pairs that ``cls``'s annotated signature (``splitnn.params``) refuses: just past every
    declared bound (``ge``, ``gt``, ``le``, ``lt``), and a string outside every ``Literal`` of choices."""
    bad: list[tuple[str, Any]] = []
    for name, field in signature_model(cls).model_fields.items():
        base, bounds = _constrained(field.annotation)
        bounds = [*field.metadata, *bounds]
        if typing.get_origin(base) is Literal:
            bad.append((name, "not-one-of-the-choices"))
            continue
        if base not in (int, float):
            continue
        step = 1 if base is int else 1.0
        for bound in bounds:
            for attribute, past in (("ge", -step), ("gt", 0), ("le", step), ("lt", 0)):
                limit = getattr(bound, attribute, None)
                if limit is not None:
                    bad.append((name, base(limit) + past))
    return bad
