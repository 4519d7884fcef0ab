"""Few-shot subsets of a labelled cache: K images per class, drawn with a fixed seed.

The draw is a pure function of (the cache's labels, K, the classes, the seed): class c's shots
are ``default_rng([seed, c]).choice(its images, K, replace=False)``, so a run on 2 ranks and
one on 8 train on the same images, and adding a class does not change another class's shots.
Indices are sample indices of the dataset (an image with several captions counts once: its
first sample). The training loop's sampler (dodo/data/sampler.py) then shuffles the subset.

Torch-free: ``class_counts`` and ``check_fewshot_data`` run at ``dodo submit`` and read the
manifest and the shards' ``labels`` arrays (h5py / zarr), never an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

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


def base_split(n_classes: int, base_classes: Sequence[int], base_to_new: bool = True) -> tuple[list[int], list[int]]:
    """(base, new) class indices: ``base_classes`` or the first half (ceil(C / 2), CoCoOp's
    base-to-new split); new = the rest (none when ``base_to_new`` is false: all classes are base)."""
    if not base_to_new:
        return list(range(n_classes)), []
    base = sorted(base_classes) if base_classes else list(range((n_classes + 1) // 2))
    return base, [c for c in range(n_classes) if c not in set(base)]


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


def check_fewshot_data(train_cache: str, eval_cache: str, p: Any, global_batch: int) -> Optional[tuple[str, str]]:
    """None, or (key, message) for the first problem a prompt-learning run would hit: a cache
    without labels or class names, base classes outside it, a class with fewer images than
    ``p.shots`` (named, with its count), a few-shot set smaller than one global batch, or an
    eval cache with other classes. ``p``: the PromptConfig."""
    from dodo.data.manifest import CacheError, Manifest
    from dodo.eval import classnames as cn

    try:
        m = Manifest.load(Path(train_cache).expanduser())
    except CacheError as err:
        return "data.train_cache", str(err)
    fix = "build a labelled cache with class names (dodo data cache SRC --from folder|cifar, docs/data.md)"
    if not m.has_labels:
        return "data.train_cache", f"{train_cache} has no labels, but prompt learning trains a classifier; {fix}"
    try:
        names = cn.classnames(p.classnames, list(m.classnames))
    except cn.ClassListError as err:
        return "model.prompt.classnames", f"{err} (prompt learning builds its prompts from class names); {fix}"
    if not p.classnames and all(n.strip().isdigit() for n in names):  # e.g. webdataset .cls labels
        return "model.prompt.classnames", (f"is unset and {train_cache} names its classes only by index "
                                          f"({', '.join(names[:3])}, ...), but prompts are built from class "
                                          "names; set model.prompt.classnames to clip_benchmark:<dataset> or a "
                                          "file with one name per line")
    counts = class_counts(train_cache)
    if len(names) != len(counts):
        return "model.prompt.classnames", (f"gives {len(names)} class names, but {train_cache} has "
                                          f"{len(counts)} classes; name the list that matches the cache")
    outside = [c for c in p.base_classes if c >= len(names)]
    if outside:
        return "model.prompt.base_classes", f"has class {outside[0]}, but {train_cache} has {len(names)} classes (0..{len(names) - 1})"
    base, _ = base_split(len(names), p.base_classes, p.base_to_new)
    short = [c for c in base if counts[c] < p.shots]
    if short:
        c = short[0]
        return "model.prompt.shots", (f"is {p.shots}, but class {c} ({names[c]!r}) of {train_cache} has only "
                                      f"{counts[c]} images; lower model.prompt.shots to {int(counts[base].min())} "
                                      "or drop that class from model.prompt.base_classes")
    if p.shots * len(base) < global_batch:
        return "train.micro_batch", (f"gives a global batch of {global_batch}, more than the {p.shots * len(base)} "
                                     f"few-shot images ({p.shots} shots x {len(base)} classes); lower "
                                     "train.micro_batch (or grad_accum) to fit")
    if eval_cache and (Path(eval_cache).expanduser() / "manifest.json").exists():
        e = Manifest.load(Path(eval_cache).expanduser())
        if not e.has_labels:
            return "data.eval_cache", f"{eval_cache} has no labels; prompt learning scores classes: {fix}"
        n_eval = len(e.classnames or e.class_ids)
        if n_eval and n_eval != len(names):
            return "data.eval_cache", (f"{eval_cache} has {n_eval} classes but {train_cache} has {len(names)}; "
                                       "use the test split of the same dataset")
    return None
