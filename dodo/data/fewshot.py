"""Few-shot subsets of a labelled cache: K images per class, drawn with a fixed seed.

The draw is a pure function of (the cache's labels, K, the classes, the seed): class c's shots
are ``default_rng([seed, c]).choice(its images, K, replace=False)``, so a run on 2 ranks and
one on 8 train on the same images, and adding a class does not change another class's shots.
Indices are sample indices of the dataset (an image with several captions counts once: its
first sample). The training loop's sampler (dodo/data/sampler.py) then shuffles the subset.

The submit-time checks (enough images per class, class names) are config-level code in
dodo/models/prompt/config.py; ``class_counts`` here is their data-layer twin (tested equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def first_samples(labels: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Sample indices that start an image (one per image), in order. ``image_ids`` (N,) with -1
    for samples without an image id (each is its own image)."""
    keep = np.ones(len(labels), bool)
    keep[1:] = (image_ids[1:] != image_ids[:-1]) | (image_ids[1:] < 0)
    return np.flatnonzero(keep)


def few_shot_indices(labels: np.ndarray, image_ids: np.ndarray, shots: int, seed: int,
                     classes: Sequence[int]) -> np.ndarray:
    """Sorted sample indices: ``shots`` distinct images of every class in ``classes``.

    ``labels`` / ``image_ids``: (N,) per sample (CachedDataset.labels() / image_ids()).
    Raises ValueError naming a class with fewer images than ``shots``."""
    starts = first_samples(np.asarray(labels), np.asarray(image_ids))
    lab = np.asarray(labels)[starts]
    out = []
    for c in classes:
        pool = starts[lab == c]
        if len(pool) < shots:
            raise ValueError(f"class {c} has {len(pool)} images, fewer than {shots} shots")
        pick = np.random.default_rng([seed, int(c)]).choice(len(pool), shots, replace=False)
        out.append(pool[np.sort(pick)])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def class_counts(root: str | Path) -> np.ndarray:
    """(C,) images per class of a labelled cache, from its shards' ``labels`` arrays (one row per
    image). C = the manifest's class count (or the largest label + 1)."""
    from dodo.data.manifest import Manifest
    from dodo.data.store import ShardReader

    root = Path(root).expanduser()
    m = Manifest.load(root)
    labels = []
    for info in m.shards:
        reader = ShardReader(m.shard_path(root, info), m.store)  # type: ignore[arg-type]
        reader.open()
        labels.append(np.asarray(reader.labels, np.int64))
        reader.close()
    flat = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    flat = flat[flat >= 0]
    n = max(len(m.classnames or m.class_ids), int(flat.max()) + 1 if len(flat) else 0)
    return np.bincount(flat, minlength=n)
