"""An attack in chunks (``evaluation.batch_size``): the attacked images in chunks of ``batch_size``, one
``reconstruct`` call each, and the chunks' Reconstructions merged into the cell's one.

For an attack that solves each sample as if alone (the contract suite checks every class that claims it), chunking
changes how much memory a call holds, not what it returns: the images equal the unchunked ones up to float
reordering. An attack whose samples interact (one that estimated something from the whole batch) gets what it
would see on each chunk alone.

Determinism. Before chunk ``i`` the global RNG is seeded with ``chunk_seed(seed, i)``: chunk 0 gets the cell's
seed itself (exactly what an unchunked call sees), later chunks a hash of (seed, i). A row then depends only on
its config, never on what ran before it.

Trained artefacts. All chunks get the same AttackContext object, so the auxiliary split is drawn once and the
query oracle's random stream runs on across chunks. A learned attack (inverse_net, shadow) trains in the first
chunk's call and the later calls load it: the runner always gives a ``cache_key``, and ``attacks.cache`` then
saves to ``cache_dir``, or with ``cache_dir=None`` to ``splitnn.training.default_cache_dir()`` (never a
cache-less retrain). ``from_cache`` and ``train_losses`` are therefore the first chunk's.

How diagnostics merge (``merge_diagnostics``), key by key, recursively through dicts and through lists of dicts of
one length in every chunk (PEEL's ``stages``):

* ``budget``: the same meaning as unchunked. Its means over samples (``end_to_end_iterations``,
  ``end_to_end_evaluations``, ``blockwise_evaluations``) are weighted by chunk size, i.e. the chunks' totals
  summed and divided by the images; ``*_per_sample`` lists are concatenated; ``seconds`` summed.
* a value equal in every chunk is kept as it is (``loss``, ``solver``, a stage's name);
* ``SUMMED`` keys (wall times) are summed, ``MAXIMA`` (iteration maxima over samples) take the largest, ``ANY``
  (``timed_out``) is true if any chunk's is, ``PER_SAMPLE`` lists (a start chosen per sample, per-sample
  evaluations) are concatenated, ``FIRST`` keys are the first chunk's (see above);
* anything else that differs between chunks (relative residuals over a chunk's batch, a defense reading's
  estimates) has no exact merge from the chunks' values: it becomes ``{"per_chunk": [value of each chunk]}``.

``diagnostics["chunked"]`` records the batch size and the chunks' sizes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leakbench.attacks.base import Attack, AttackContext, Reconstruction
from leakbench.splitnn.progress import progress_bar
from leakbench.splitnn.training import config_hash

SUMMED = frozenset({"seconds", "refine_seconds"})
MAXIMA = frozenset({"iterations", "lbfgs_iterations", "adam_iterations", "fixed_point_iterations"})
ANY = frozenset({"timed_out"})
PER_SAMPLE = frozenset({"start", "refine_start", "evaluations"})
FIRST = frozenset({"from_cache", "train_losses"})
#: ``budget`` entries that are means over samples (``attacks.base.budget``)
BUDGET_MEANS = ("end_to_end_iterations", "end_to_end_evaluations", "blockwise_evaluations")


def chunk_seed(seed: int, index: int) -> int:
    """The global torch seed before chunk ``index``: the cell's own seed for chunk 0, else a hash of both."""
    return seed if index == 0 else int(config_hash({"chunk_of_seed": seed, "chunk": index}), 16) % (2 ** 31)


def chunk_slices(n: int, batch_size: int | None) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` of ``n`` images (one slice when ``batch_size`` is None)."""
    step = n if batch_size is None or batch_size >= n else batch_size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))] or [slice(0, 0)]


def reconstruct(attack: Attack, client: nn.Module, features: torch.Tensor, context: AttackContext, *,
                batch_size: int | None, seed: int) -> Reconstruction:
    """``attack.reconstruct`` on ``features``, in chunks of ``batch_size`` when that is smaller than the batch
    (else one call, exactly as unchunked), merged into one Reconstruction. A bar over the images shows inside
    ``splitnn.progress.attack_progress(True)``."""
    slices = chunk_slices(len(features), batch_size)
    if len(slices) == 1:
        return attack.reconstruct(client, features, context=context)
    parts = []
    with progress_bar(len(features), f"{attack.name} in chunks of {batch_size}", unit="image") as bar:
        for index, part in enumerate(slices):
            torch.manual_seed(chunk_seed(seed, index))
            parts.append(attack.reconstruct(client, features[part], context=context))
            bar.update(part.stop - part.start)
    merged = merge(parts)
    merged.diagnostics["chunked"] = {"batch_size": batch_size, "sizes": [len(p.images) for p in parts]}
    return merged


def merge(parts: list[Reconstruction]) -> Reconstruction:
    """One Reconstruction from those of consecutive chunks: images, alternatives and every intermediate
    concatenated along the batch, diagnostics by ``merge_diagnostics``. Chunks that disagree on which
    alternatives or how many intermediates they return raise ValueError (there is no batch to put them in)."""
    names = [sorted(p.alternatives) for p in parts]
    depths = {len(p.intermediates) for p in parts}
    if any(n != names[0] for n in names) or len(depths) > 1:
        raise ValueError(f"the chunks returned different alternatives {names} or numbers of intermediates "
                         f"{sorted(depths)}: they cannot be merged into one batch")
    sizes = [len(p.images) for p in parts]
    return Reconstruction(
        torch.cat([p.images for p in parts]),
        merge_diagnostics([p.diagnostics for p in parts], sizes),
        {name: torch.cat([p.alternatives[name] for p in parts]) for name in names[0]},
        [torch.cat([p.intermediates[i] for p in parts]) for i in range(depths.pop())])


def merge_diagnostics(chunks: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The chunks' diagnostics as one dict, by the rules in this module's docstring."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for chunk in chunks for k in chunk):  # every key, in first-seen order
        values: list[Any] = [chunk.get(key) for chunk in chunks]
        out[key] = merge_budget(values, sizes) if key == "budget" and all(isinstance(v, dict) for v in values) \
            else _merge_value(key, values, sizes)
    return out


def merge_budget(budgets: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The chunks' ``budget`` dicts as the cell's: means weighted by chunk size, per-sample lists concatenated,
    seconds summed; any other entry by the general rules."""
    total = sum(sizes)
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for b in budgets for k in b):
        values: list[Any] = [b.get(key) for b in budgets]
        if key in BUDGET_MEANS and all(_number(v) for v in values):
            out[key] = sum(float(v) * n for v, n in zip(values, sizes)) / total if total else 0.0
        elif key.endswith("_per_sample") and all(isinstance(v, list) for v in values):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = _merge_value(key, values, sizes)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _merge_value(key: str, values: list[Any], sizes: list[int]) -> Any:
    if key in FIRST:
        return values[0]
    if key in SUMMED and all(_number(v) for v in values):
        return sum(values)
    if key in PER_SAMPLE and all(isinstance(v, list) and len(v) == n for v, n in zip(values, sizes)):
        return [x for v in values for x in v]
    if all(v == values[0] for v in values[1:]):
        return values[0]
    if key in MAXIMA and all(_number(v) for v in values):
        return max(values)
    if key in ANY and all(isinstance(v, bool) for v in values):
        return any(values)
    if all(isinstance(v, dict) for v in values):
        return merge_diagnostics(values, sizes)
    if all(isinstance(v, list) and len(v) == len(values[0]) and all(isinstance(x, dict) for x in v)
           for v in values):
        return [merge_diagnostics(list(items), sizes) for items in zip(*values)]
    return {"per_chunk": values}
