"""Datasets stored one image per file, read from the user's disk, never downloaded: an image folder
(torchvision's ``ImageFolder``), CelebA with identity labels (torchvision's ``CelebA``) and LFW people
(scikit-learn's ``fetch_lfw_people``). Only the kept images are decoded, in batches (``disk_datasets``).

The image folder and CelebA take ``lazy``: true keeps each split as ``lazy_images.LazyImages``, which decodes
(resizes, centre-crops) only the images indexed, when they are; false decodes the kept images up front; ``auto``
(the default) is lazy for a split of more than ``lazy_images.LAZY_ABOVE`` images. The pixels are the same either
way. LFW people stays eager: scikit-learn decodes it whole, and it has at most 13,233 images."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from leakbench.splitnn import datasets
from leakbench.splitnn.disk_datasets import (as_dataset, check_caps, from_float, kept_indices, kept_total,
                                                 require_files, to_channels)
from leakbench.splitnn.errors import ParameterError, check_number
from leakbench.splitnn.lazy_images import Lazy, LazyImages, resolve

CELEBA_IDENTITIES = 10177
#: Batches in which images stored as files are decoded (only the kept ones are ever opened).
DECODE_BATCH = 256


def _pil_transform(size: int) -> Any:
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])


def _decode(dataset: Any, indices: np.ndarray, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of ``dataset[i]`` for the kept ``indices``, decoded in batches with a progress bar."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=DECODE_BATCH, shuffle=False)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"decoding {what}", unit="batch", leave=False, disable=len(loader) < 4):
        xs.append(x)
        ys.append(torch.as_tensor(y).reshape(len(x), -1)[:, 0])
    return torch.cat(xs), torch.cat(ys).long()


def _check_lazy(lazy: Any) -> None:
    if not (isinstance(lazy, bool) or lazy == "auto"):
        raise ParameterError("lazy", lazy, "true, false or 'auto'")


def _split_images(dataset: Any, kept: np.ndarray, labels: torch.Tensor, channels: int, size: int, lazy: Lazy,
                  what: str) -> tuple[datasets.Images, torch.Tensor]:
    """(images, labels) of ``dataset[i]`` for the ``kept`` indices; ``labels`` are those of every index (read
    without decoding). Lazy: decoded when indexed, each image as ``_decode`` decodes it."""
    if not resolve(lazy, len(kept)):
        x, y = _decode(dataset, kept, what)
        return to_channels(x, channels), y

    def decode(indices: Any) -> torch.Tensor:
        return to_channels(torch.stack([dataset[i][0] for i in indices]), channels)

    return LazyImages(decode, kept, (channels, size, size)), labels[torch.as_tensor(kept, dtype=torch.long)]


def _keyed(params: dict[str, Any], lazy: Lazy) -> dict[str, Any]:
    """``params`` with ``lazy`` only when it is not the default (how, not what: the keys stay as they were)."""
    return params if lazy == "auto" else {**params, "lazy": lazy}


# -- An image folder: torchvision's ImageFolder, split by train/ and test/ sub-folders or by a fraction ------
def _folder(root: Path, key_root: str) -> Any:
    """torchvision's ImageFolder over ``root`` (it lists the files; nothing is decoded), or ParameterError."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root))
    except (FileNotFoundError, OSError) as exc:
        raise ParameterError("root", key_root, "a folder with one sub-folder of images per class "
                                               f"(torchvision ImageFolder: {exc})") from None


def _folders(root: str) -> tuple[Any, Any | None]:
    """The ImageFolder(s) of ``root``: (train, test) when it has ``train/`` and ``test/``, else (all, None)."""
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise ParameterError("root", str(root), "an existing folder of class sub-folders, or with train/ and "
                                                "test/ sub-folders of class sub-folders")
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, test = _folder(path / "train", str(root)), _folder(path / "test", str(root))
        if train.classes != test.classes:
            raise ParameterError("root", str(root), f"the same classes under train/ and test/; train/ has "
                                                    f"{train.classes[:5]}, test/ has {test.classes[:5]}")
        return train, test
    return _folder(path, str(root)), None


def _fraction_split(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): stratified by class where every class has two images, else seeded random."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(targets)
    stratify = targets if counts[counts > 0].min() >= 2 else None
    train, test = train_test_split(np.arange(len(targets)), test_size=test_fraction, random_state=seed,
                                   stratify=stratify)
    return np.sort(train), np.sort(test)


def _image_folder_check(root: str, size: int, channels: int, test_fraction: float, train_images: int | None,
                        test_images: int | None, split_seed: int, lazy: Lazy = "auto") -> tuple[int, int]:
    datasets.check_common(size, channels, test_fraction, split_seed)
    check_caps(train_images, test_images)
    _check_lazy(lazy)
    train, test = _folders(root)
    n_train, n_test = (len(train), len(test)) if test is not None else \
        (len(train) - round(test_fraction * len(train)), round(test_fraction * len(train)))
    if min(n_train, n_test) < 1:
        raise ParameterError("root", str(root), f"images for both splits; it has {len(train)} in all")
    return len(train.classes), kept_total((n_train, n_test), train_images, test_images)


@datasets.register("image_folder", check=_image_folder_check)
def image_folder(root: str, size: int = 64, channels: int = 3, test_fraction: float = 0.25,
                 train_images: int | None = None, test_images: int | None = None,
                 split_seed: int = 0, lazy: Lazy = "auto") -> datasets.Dataset:
    """The user's own images: one sub-folder per class (torchvision ``ImageFolder``), each image resized and
    centre-cropped to ``size``. ``root/train`` and ``root/test`` give the split; otherwise a seeded, stratified
    ``test_fraction`` of ``root`` is the test split. ``lazy``: decode on demand (see the module)."""
    num_classes, _ = _image_folder_check(root, size, channels, test_fraction, train_images, test_images, split_seed,
                                         lazy)
    train, test = _folders(root)
    transform = _pil_transform(size)
    if test is None:
        train_idx, test_idx = _fraction_split(np.asarray(train.targets), test_fraction, split_seed)
        test = train
    else:
        train_idx, test_idx = np.arange(len(train)), np.arange(len(test))
    splits = {}
    for offset, (split, folder, index, cap) in enumerate((("train", train, train_idx, train_images),
                                                          ("test", test, test_idx, test_images))):
        folder.transform = transform
        kept = index[kept_indices(len(index), cap, split_seed + offset)]
        splits[split] = _split_images(folder, kept, torch.as_tensor(folder.targets, dtype=torch.long), channels,
                                      size, lazy, f"{split} images")
    params = dict(root=root, size=size, channels=channels, test_fraction=test_fraction,
                  train_images=train_images, test_images=test_images, split_seed=split_seed)
    return as_dataset("image_folder", splits["train"], splits["test"], num_classes, _keyed(params, lazy))


# -- CelebA with identity labels: torchvision's CelebA ----------------------------------------------------
CELEBA_FILES = ("img_align_celeba/", "list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")
CELEBA_SPLITS = {"train": "0", "valid": "1", "test": "2"}


def _celeba_check(root: str, size: int, channels: int, train_images: int | None, test_images: int | None,
                  split_seed: int, lazy: Lazy = "auto") -> tuple[int, int]:
    datasets.check_common(size, channels, split_seed=split_seed)
    check_caps(train_images, test_images)
    _check_lazy(lazy)
    require_files(root, [f"celeba/{f}" for f in CELEBA_FILES],
             lambda path, f: (path / f).is_dir() if f.endswith("/") else (path / f).is_file())
    with open(Path(str(root)).expanduser() / "celeba" / "list_eval_partition.txt") as file:
        partition = [line.split()[-1] for line in file if line.strip()]
    counts = [partition.count(CELEBA_SPLITS[s]) for s in ("train", "test")]
    return CELEBA_IDENTITIES, kept_total(counts, train_images, test_images)


@datasets.register("celeba", check=_celeba_check)
def celeba(root: str, size: int = 64, channels: int = 3, train_images: int | None = None,
           test_images: int | None = None, split_seed: int = 0, lazy: Lazy = "auto") -> datasets.Dataset:
    """CelebA (torchvision's ``CelebA``, ``download=False``, its own train/test partition) with identity labels
    (0-based, 10,177 identities), for identity-level attack accuracy; aligned faces resized and centre-cropped.
    ``lazy``: decode on demand (see the module)."""
    _celeba_check(root, size, channels, train_images, test_images, split_seed, lazy)
    from torchvision.datasets import CelebA

    splits = {}
    for offset, (split, cap) in enumerate((("train", train_images), ("test", test_images))):
        try:
            data = CelebA(str(Path(root).expanduser()), split=split, target_type="identity",
                          transform=_pil_transform(size), download=False)
        except RuntimeError as exc:  # torchvision checks the listed files' MD5
            raise ParameterError("root", str(root), f"CelebA's files as published ({exc})") from None
        x, y = _split_images(data, kept_indices(len(data), cap, split_seed + offset), data.identity[:, 0].long(),
                             channels, size, lazy, f"CelebA {split}")
        splits[split] = (x, y - 1)
    params = dict(root=root, size=size, channels=channels, train_images=train_images, test_images=test_images,
                  split_seed=split_seed)
    return as_dataset("celeba", splits["train"], splits["test"], CELEBA_IDENTITIES, _keyed(params, lazy))


# -- LFW people: scikit-learn's fetch_lfw_people on a data home that already holds LFW --------------------
LFW_FILES = ("lfw_home/pairsDevTrain.txt", "lfw_home/pairsDevTest.txt", "lfw_home/pairs.txt",
             "lfw_home/lfw_funneled/")


def _lfw_people_counts(root: str, min_faces: int) -> list[int]:
    folder = Path(str(root)).expanduser() / "lfw_home" / "lfw_funneled"
    counts = [len(list(person.glob("*.jpg"))) for person in sorted(folder.iterdir()) if person.is_dir()]
    return [n for n in counts if n >= min_faces]


def _lfw_people_check(root: str, size: int, channels: int, min_faces_per_person: int, test_fraction: float,
                      split_seed: int) -> tuple[int, int]:
    datasets.check_common(size, channels, test_fraction, split_seed)
    check_number("min_faces_per_person", min_faces_per_person, low=2, high=1000, integer=True)
    require_files(root, LFW_FILES, lambda path, f: (path / f).is_dir() if f.endswith("/") else (path / f).is_file())
    counts = _lfw_people_counts(root, min_faces_per_person)
    if len(counts) < 2:
        raise ParameterError("min_faces_per_person", min_faces_per_person,
                             f"a threshold that at least two people of {root} reach")
    return len(counts), sum(counts)


@datasets.register("lfw_people", check=_lfw_people_check)
def lfw_people(root: str, size: int = 64, channels: int = 3, min_faces_per_person: int = 20,
               test_fraction: float = 0.25, split_seed: int = 0) -> datasets.Dataset:
    """LFW with identities (scikit-learn's ``fetch_lfw_people``, ``download_if_missing=False``, ``root`` its
    ``data_home``): the people with at least ``min_faces_per_person`` images, the face crop, split per person."""
    num_classes, _ = _lfw_people_check(root, size, channels, min_faces_per_person, test_fraction, split_seed)
    from sklearn.datasets import fetch_lfw_people

    people = fetch_lfw_people(data_home=str(Path(root).expanduser()), min_faces_per_person=min_faces_per_person,
                              color=channels == 3, resize=None, download_if_missing=False)
    train_idx, test_idx = _fraction_split(people.target, test_fraction, split_seed)
    x, y = from_float(torch.as_tensor(people.images).float(), size, channels), torch.as_tensor(people.target).long()
    params = dict(root=root, size=size, channels=channels, min_faces_per_person=min_faces_per_person,
                  test_fraction=test_fraction, split_seed=split_seed)
    return as_dataset("lfw_people", (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), num_classes, params)
