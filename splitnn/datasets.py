"""Image datasets that exist offline, as float tensors in [0, 1] with a fixed stratified train/test split (or,
for large sets of image files, ``lazy_images.LazyImages`` that decode on demand).

``digits`` (scikit-learn's bundled 8x8 digits) is the embedded default. ``lfw_faces`` is
scikit-image's ``lfw_subset``: 100 real LFW faces and 100 non-face patches (label 1 = face).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from leakbench.splitnn.errors import ParameterError, check_number
from leakbench.splitnn.lazy_images import Images as Images  # re-exported: what x_train and x_test are
from leakbench.splitnn.registry import Registry

#: Parameters that choose how a dataset is loaded rather than what it holds: they enter the resolved parameters
#: (and so cell and checkpoint keys) only when they differ from their default, so adding one keeps every key.
UNKEYED = frozenset({"lazy"})

_registry: Registry["Dataset"] = Registry("dataset")
#: name -> its parameters' check, returning (number of classes, number of images): what validation needs, known
#: without loading anything (a dataset on disk checks its files there and reads only their headers).
_CHECKS: dict[str, Callable[..., tuple[int, int]]] = {}


def register(name: str, num_classes: int | None = None, num_images: int | None = None,
              check: Callable[..., tuple[int, int]] | None = None) -> Callable[[Callable[..., "Dataset"]], Callable]:
    """Register a dataset factory with its sizes, or with ``check(**params) -> (num_classes, num_images)``,
    which raises ParameterError for a bad parameter (e.g. a ``root`` without the expected files)."""
    def fixed(**params: Any) -> tuple[int, int]:
        check_common(**params)
        return num_classes, num_images  # type: ignore[return-value]

    _CHECKS[name] = check or fixed
    return _registry.register(name)


@dataclass
class Dataset:
    """Train and test images (N, C, H, W) in [0, 1] with integer labels. The images are tensors, or lazy sets that
    decode what is indexed (``lazy_images``): consumers index or slice them, in batches."""

    name: str
    x_train: Images
    y_train: torch.Tensor
    x_test: Images
    y_test: torch.Tensor
    num_classes: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]


def _to_tensor(images: np.ndarray, size: int, channels: int) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, channels, size, size), bilinear resize, clipped back into [0, 1]."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0).repeat(1, channels, 1, 1).contiguous()


def _split(name: str, images: np.ndarray, labels: np.ndarray, size: int, channels: int,
           test_fraction: float, split_seed: int, num_classes: int, params: dict) -> Dataset:
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=split_seed, stratify=labels)
    x = _to_tensor(images, size, channels)
    y = torch.as_tensor(labels, dtype=torch.long)
    return Dataset(name, x[idx_train], y[idx_train], x[idx_test], y[idx_test], num_classes, params)


def check_common(size: int, channels: int, test_fraction: float = 0.5, split_seed: int = 0) -> None:
    check_number("size", size, low=8, high=512, integer=True)
    check_number("channels", channels, low=1, high=3, integer=True)
    check_number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
    check_number("split_seed", split_seed, low=0, high=2 ** 32 - 1, integer=True)  # scikit-learn's bound


@register("digits", num_classes=10, num_images=1797)
def digits(size: int = 32, channels: int = 3, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upsampled to ``size``."""
    from sklearn.datasets import load_digits

    check_common(size, channels, test_fraction, split_seed)
    bunch = load_digits()
    images = bunch.images / 16.0
    params = dict(size=size, channels=channels, test_fraction=test_fraction, split_seed=split_seed)
    return _split("digits", images, bunch.target, size, channels, test_fraction, split_seed, 10, params)


@register("lfw_faces", num_classes=2, num_images=200)
def lfw_faces(size: int = 32, channels: int = 3, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """scikit-image's ``lfw_subset``: 100 LFW faces (label 1) and 100 non-faces (label 0), 25x25."""
    from skimage.data import lfw_subset

    check_common(size, channels, test_fraction, split_seed)
    images = lfw_subset()  # already float64 in [0, 1]
    labels = np.array([1] * 100 + [0] * 100)
    params = dict(size=size, channels=channels, test_fraction=test_fraction, split_seed=split_seed)
    return _split("lfw_faces", images, labels, size, channels, test_fraction, split_seed, 2, params)


#: (image, rows, cols): square crops around the face of the two high-resolution portraits that ship offline
PORTRAITS = (("skimage:astronaut", slice(20, 210), slice(130, 320)),
             ("matplotlib:grace_hopper.jpg", slice(110, 360), slice(135, 385)))


def _portrait(source: str, rows: slice, cols: slice) -> np.ndarray:
    """One portrait as (H, W, 3) floats in [0, 1], cropped to the face."""
    library, name = source.split(":")
    if library == "skimage":
        import skimage.data
        image = getattr(skimage.data, name)()
    else:
        import matplotlib.cbook
        from PIL import Image
        with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as file:
            image = np.asarray(file.convert("RGB"))
    return image[rows, cols].astype(np.float64) / 255.0


@register("portraits", num_classes=2, num_images=202)
def portraits(size: int = 64, channels: int = 3) -> Dataset:
    """Two real high-resolution portraits (scikit-image's astronaut, matplotlib's Grace Hopper), cropped to
    the face, as the *test* images; the training set is ``lfw_subset`` (100 faces, label 1, and 100
    non-faces), so the target model has seen faces but never these two people."""
    from skimage.color import rgb2gray
    from skimage.data import lfw_subset

    check_common(size, channels)
    faces = [_portrait(*spec) for spec in PORTRAITS]
    x_test = torch.cat([_to_tensor(rgb2gray(f)[None], size, channels) if channels != 3 else
                        F.interpolate(torch.as_tensor(f, dtype=torch.float32).permute(2, 0, 1)[None],
                                      size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
                        for f in faces])
    x_train = _to_tensor(lfw_subset(), size, channels)
    y_train = torch.as_tensor([1] * 100 + [0] * 100, dtype=torch.long)
    return Dataset("portraits", x_train, y_train, x_test.contiguous(), torch.ones(len(faces), dtype=torch.long), 2,
                   dict(size=size, channels=channels))


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset will be, known without loading it: its resolved parameters and sizes."""

    name: str
    params: dict[str, Any]
    num_classes: int
    num_images: int

    @property
    def in_channels(self) -> int:
        return self.params["channels"]

    @property
    def size(self) -> int:
        return self.params["size"]


def describe(name: str, **params: Any) -> DatasetInfo:
    """Check a dataset's parameters and resolve their defaults, without loading it (config validation)."""
    factory = _registry.factory(name)
    signature = inspect.signature(factory)
    resolved = {p.name: params.get(p.name, p.default) for p in signature.parameters.values()}
    for key, value in resolved.items():
        if value is inspect.Parameter.empty:
            raise ParameterError(key, None, f"a value: dataset {name!r} has no default for {key!r}")
    unknown = sorted(set(params) - set(resolved))
    if unknown:
        raise ParameterError(unknown[0], params[unknown[0]],
                             f"no such parameter of dataset {name!r}; known: {', '.join(resolved)}")
    sizes = _CHECKS[name](**resolved)
    defaults = {p.name: p.default for p in signature.parameters.values()}
    keyed = {k: v for k, v in resolved.items() if k not in UNKEYED or v != defaults[k]}
    return DatasetInfo(name, keyed, *sizes)


def get(name: str, **params: Any) -> Dataset:
    """Load a dataset by name, e.g. ``datasets.get("digits", size=32)``."""
    return _registry.get(name, **params)


def names() -> list[str]:
    return _registry.names()


def factory(name: str) -> Callable[..., Any]:
    """The function registered as ``name`` (its signature declares the dataset's parameters), without calling it."""
    return _registry.factory(name)


from leakbench.splitnn import disk_datasets, image_file_datasets  # noqa: E402,F401  (register the datasets on disk)
