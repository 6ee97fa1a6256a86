"""Image sets decoded on demand: a folder of 200,000 files never sits in memory as one tensor.

A ``LazyImages`` stands where a dataset's ``x_train`` / ``x_test`` tensor stood. It has the tensor's ``len``,
``shape`` (N, C, H, W) and ``dtype``, and indexing it with an int, a slice, or a list / array / LongTensor of
indices (or a boolean mask) decodes just those images, in batches of ``batch_size``, and returns them as a float
tensor in [0, 1]: the same pixels the eager loader returned. What indexes, or slices in batches (the training
loop, accuracy, the query oracle, the evaluation classifier) runs unchanged; what wants the whole tensor at once
takes a capped subset instead (``evaluation.attack_context.auxiliary_split``).

``LazyMap`` is a lazy set seen through a function (e.g. the client, to fine-tune a server half on features
that are never all computed at once).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence, Union

import numpy as np
import torch

#: How many images one decode call gets at most; a larger request is decoded in several.
DECODE_BATCH = 256

#: A dataset's ``lazy`` parameter: decode on demand (true), up front (false), or on demand above LAZY_ABOVE images.
Lazy = Union[bool, Literal["auto"]]
#: ``lazy: auto`` decodes a split on demand when it keeps more images than this.
LAZY_ABOVE = 20_000

#: ``decode(source indices) -> (len(indices), C, H, W)`` floats in [0, 1].
Decoder = Callable[[Sequence[int]], torch.Tensor]


def positions(key: Any, n: int) -> np.ndarray | int:
    """The positions ``key`` selects in a set of ``n`` (an int for an int key), with numpy's rules: negative
    indices count from the end, a boolean mask must have length ``n``, out of range raises IndexError."""
    if isinstance(key, torch.Tensor):
        key = key.item() if key.dim() == 0 and not key.dtype.is_floating_point else key.cpu().numpy()
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(np.arange(n)[key])
    if isinstance(key, slice):
        return np.arange(n)[key]
    array = np.asarray(key)
    if array.dtype != bool and array.size == 0:
        array = array.astype(np.int64)  # [] is an empty selection
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise IndexError(f"images are indexed by ints, slices, integer arrays or boolean masks, not {array.dtype}")
    return np.arange(n)[array]


class LazyImages:
    """N images (C, H, W), decoded by ``decode`` from the source indices ``indices`` when indexed.

    Nothing is decoded at construction; no request is served from memory (there is no cache: an epoch over
    a set larger than memory would evict everything anyway, and the file system caches the bytes).
    """

    dtype = torch.float32

    def __init__(self, decode: Decoder, indices: Sequence[int] | np.ndarray, image_shape: Sequence[int],
                 batch_size: int = DECODE_BATCH):
        self._decode = decode
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.batch_size = batch_size

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), *self.image_shape))

    def __len__(self) -> int:
        return len(self.indices)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        return f"LazyImages({tuple(self.shape)}, decoded on demand)"

    def __getitem__(self, key: Any) -> torch.Tensor:
        where = positions(key, len(self))
        if isinstance(where, int):
            return self._load(self.indices[[where]])[0]
        return self._load(self.indices[where])

    def subset(self, key: Any) -> "LazyImages":
        """The images ``key`` selects, still lazy."""
        where = positions(key, len(self))
        return LazyImages(self._decode, self.indices[np.atleast_1d(where)], self.image_shape, self.batch_size)

    def _load(self, source: np.ndarray) -> torch.Tensor:
        """Decode the source images ``source``, ``batch_size`` at a time."""
        if len(source) == 0:
            return torch.empty((0, *self.image_shape), dtype=self.dtype)
        parts = []
        for start in range(0, len(source), self.batch_size):
            part = self._decode(source[start:start + self.batch_size].tolist())
            if tuple(part.shape[1:]) != self.image_shape:
                raise ValueError(f"decoded images of shape {tuple(part.shape[1:])}, expected {self.image_shape}")
            parts.append(part.to(self.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class LazyMap:
    """``function(images[key])`` for a lazy ``images``, computed per request (``function`` maps a batch)."""

    def __init__(self, images: Any, function: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.function = images, function

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Any) -> torch.Tensor:
        where = positions(key, len(self))
        if isinstance(where, int):
            return self.function(self.images[[where]])[0]
        return self.function(self.images[where])


#: Images held in memory or decoded on demand: what a dataset's ``x_train`` / ``x_test`` are. Index or slice them
#: to get a tensor; never ask a lazy one for all its images at once.
Images = Union[torch.Tensor, LazyImages]


def resolve(lazy: Lazy, n: int) -> bool:
    """Whether a split of ``n`` images is decoded on demand under the ``lazy`` parameter."""
    return n > LAZY_ABOVE if lazy == "auto" else bool(lazy)


def is_lazy(images: Any) -> bool:
    """Whether ``images`` is decoded on demand (not a tensor)."""
    return not isinstance(images, torch.Tensor)
