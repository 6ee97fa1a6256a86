"""Datasets read from the user's disk, never downloaded: Fashion-MNIST and CIFAR-10/100 (array files) here,
an image folder, CelebA and LFW people (one image per file) in ``image_file_datasets``. Torchvision's classes
read them with ``download=False``.

Each takes a ``root``. Its check (``datasets.describe``, run by config validation) looks for the files there and
reads only what the sizes need, so a wrong ``root`` stops before any work, naming the key, the path and the
files expected. ``train_images`` / ``test_images`` keep a seeded random subset of a split (None keeps it all);
only the kept images are decoded, in batches.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from leakbench.splitnn import datasets
from leakbench.splitnn.errors import ParameterError, check_number

#: Where Debian's ``dataset-fashion-mnist`` package puts the four IDX files (``dpkg -L dataset-fashion-mnist``).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def require_files(root: Any, expected: Sequence[str], found: Callable[[Path, str], bool]) -> None:
    """Raise ParameterError naming ``root`` and the expected files unless every one is found under it."""
    path = Path(str(root)).expanduser()
    if not path.is_dir():  # the value shown may be shortened: the message names the full path
        raise ParameterError("root", str(root), f"an existing folder holding {', '.join(expected)} "
                                                 f"({path.resolve()} is not a folder)")
    absent = [name for name in expected if not found(path, name)]
    if absent:
        raise ParameterError("root", str(root), f"a folder holding {', '.join(expected)}; missing under "
                                                 f"{path.resolve()}: {', '.join(absent)}")


def check_caps(train_images: int | None, test_images: int | None) -> None:
    for key, value in (("train_images", train_images), ("test_images", test_images)):
        if value is not None:
            check_number(key, value, low=1, high=10 ** 9, integer=True)


def kept_total(counts: Sequence[int], train_images: int | None, test_images: int | None) -> int:
    """How many images the two splits of ``counts`` (train, test) keep under the caps."""
    return sum(min(n, cap) if cap else n for n, cap in zip(counts, (train_images, test_images)))


def kept_indices(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``n`` items (all of them, in order, without a cap)."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> ``channels`` channels: RGB kept, otherwise luma (ITU-R 601) repeated."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.repeat(1, channels, 1, 1).contiguous()


def _from_uint8(images: np.ndarray, size: int, channels: int) -> torch.Tensor:
    """(N, H, W) or (N, H, W, 3) uint8 -> (N, channels, size, size) floats in [0, 1] (bilinear resize)."""
    return from_float(torch.as_tensor(images).float().div(255.0), size, channels)


def from_float(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """(N, H, W) or (N, H, W, 3) floats in [0, 1] -> (N, channels, size, size) (bilinear resize)."""
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return to_channels(x, channels).contiguous()


def as_dataset(name: str, train: tuple[datasets.Images, torch.Tensor], test: tuple[datasets.Images, torch.Tensor],
             num_classes: int, params: dict[str, Any]) -> datasets.Dataset:
    return datasets.Dataset(name, train[0], train[1], test[0], test[1], num_classes, params)


# -- Fashion-MNIST: the IDX files, gzipped (Debian's layout) or not (torchvision's FashionMNIST/raw) ----------
def _idx_path(root: Path, name: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _idx_header(path: Path) -> tuple[int, ...]:
    """The dimensions of an IDX file of unsigned bytes (magic 0x00 0x00 0x08 ndim, then ndim big-endian int32)."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as file:
        head = file.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08" or not 1 <= head[3] <= 3:
            raise ParameterError("root", str(path), "an IDX file of unsigned bytes (MNIST's format)")
        return tuple(int(d) for d in np.frombuffer(file.read(4 * head[3]), dtype=">i4"))


def _idx(path: Path) -> np.ndarray:
    dims = _idx_header(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as file:
        data = np.frombuffer(file.read(), dtype=np.uint8, offset=4 + 4 * len(dims))
    if data.size != int(np.prod(dims)):
        raise ParameterError("root", str(path), f"{int(np.prod(dims))} bytes of data after the header (truncated?)")
    return data.reshape(dims)


def _fashion_check(root: str, size: int, channels: int, train_images: int | None, test_images: int | None,
                   split_seed: int) -> tuple[int, int]:
    datasets.check_common(size, channels, split_seed=split_seed)
    check_caps(train_images, test_images)
    names = [n for pair in FASHION_FILES.values() for n in pair]
    require_files(root, [f"{n}[.gz]" for n in names],
                  lambda path, n: _idx_path(path, n.removesuffix("[.gz]")) is not None)
    counts = [_idx_header(_idx_path(Path(root).expanduser(), FASHION_FILES[s][0]))[0]  # type: ignore[arg-type]
              for s in ("train", "test")]
    return 10, kept_total(counts, train_images, test_images)


@datasets.register("fashion_mnist", check=_fashion_check)
def fashion_mnist(root: str = DEBIAN_FASHION_MNIST, size: int = 32, channels: int = 3,
                  train_images: int | None = None, test_images: int | None = None,
                  split_seed: int = 0) -> datasets.Dataset:
    """Fashion-MNIST (70,000 28x28 grey images, 10 classes) from ``root``: the IDX files of Debian's
    ``dataset-fashion-mnist`` (the default root) or torchvision's ``FashionMNIST/raw`` layout."""
    _fashion_check(root, size, channels, train_images, test_images, split_seed)
    base, splits = Path(root).expanduser(), {}
    for offset, (split, cap) in enumerate((("train", train_images), ("test", test_images))):
        images, labels = (_idx(_idx_path(base, n)) for n in FASHION_FILES[split])  # type: ignore[arg-type]
        keep = kept_indices(len(labels), cap, split_seed + offset)
        splits[split] = (_from_uint8(images[keep], size, channels), torch.as_tensor(labels[keep]).long())
    params = dict(root=root, size=size, channels=channels, train_images=train_images, test_images=test_images,
                  split_seed=split_seed)
    return as_dataset("fashion_mnist", splits["train"], splits["test"], 10, params)


# -- CIFAR-10 / CIFAR-100: torchvision's classes ----------------------------------------------------------
def _cifar_class(name: str) -> Any:
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if name == "cifar10" else CIFAR100


def _cifar_check(name: str, root: str, size: int, channels: int, train_images: int | None,
                 test_images: int | None, split_seed: int) -> tuple[int, int]:
    datasets.check_common(size, channels, split_seed=split_seed)
    check_caps(train_images, test_images)
    cls = _cifar_class(name)
    files = [f"{cls.base_folder}/{f}" for f, _ in cls.train_list + cls.test_list] + \
        [f"{cls.base_folder}/{cls.meta['filename']}"]
    require_files(root, files, lambda path, f: (path / f).is_file())
    return (10 if name == "cifar10" else 100), kept_total((50000, 10000), train_images, test_images)


def _cifar(name: str, root: str, size: int, channels: int, train_images: int | None, test_images: int | None,
           split_seed: int) -> datasets.Dataset:
    num_classes, _ = _cifar_check(name, root, size, channels, train_images, test_images, split_seed)
    splits = {}
    for offset, (split, cap) in enumerate((("train", train_images), ("test", test_images))):
        data = _cifar_class(name)(str(Path(root).expanduser()), train=split == "train", download=False)
        keep = kept_indices(len(data.targets), cap, split_seed + offset)
        splits[split] = (_from_uint8(data.data[keep], size, channels),
                         torch.as_tensor(np.asarray(data.targets)[keep]).long())
    params = dict(root=root, size=size, channels=channels, train_images=train_images, test_images=test_images,
                  split_seed=split_seed)
    return as_dataset(name, splits["train"], splits["test"], num_classes, params)


@datasets.register("cifar10", check=lambda **p: _cifar_check("cifar10", **p))
def cifar10(root: str, size: int = 32, channels: int = 3, train_images: int | None = None,
            test_images: int | None = None, split_seed: int = 0) -> datasets.Dataset:
    """CIFAR-10 (torchvision's ``CIFAR10``, ``download=False``) from ``root/cifar-10-batches-py``."""
    return _cifar("cifar10", root, size, channels, train_images, test_images, split_seed)


@datasets.register("cifar100", check=lambda **p: _cifar_check("cifar100", **p))
def cifar100(root: str, size: int = 32, channels: int = 3, train_images: int | None = None,
             test_images: int | None = None, split_seed: int = 0) -> datasets.Dataset:
    """CIFAR-100 (torchvision's ``CIFAR100``, fine labels, ``download=False``) from ``root/cifar-100-python``."""
    return _cifar("cifar100", root, size, channels, train_images, test_images, split_seed)
