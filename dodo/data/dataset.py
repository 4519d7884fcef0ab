"""The cached dataset: a map-style dataset over a cache's shards, and `build_datasets`.

Index ``i`` is the i-th (image, caption) pair of the cache in shard order: an image with five
captions (COCO) is five samples, keyed ``<key>#0`` .. ``<key>#4``, sharing one ``image_id``
(the image's global row in shard order) and the image's ``label``. An image-only cache gives
one sample per image with caption ""; a text-only cache one sample per text with image None.
Opening the dataset reads
only the manifest (and, with ``verify="checksum"``, hashes the shards with plain file reads);
no HDF5 / zarr handle is opened until the first ``__getitem__`` in each process, so building
the dataset before a DataLoader forks its workers is safe.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dodo.data.manifest import CacheError, Manifest
from dodo.data.sample import Sample
from dodo.data.store import ShardReader

# HDF5 consults this before taking file locks; a read-only cache on GPFS/Lustre needs none.
# (Readers also pass locking=False; the variable covers HDF5 builds where that is ignored.)
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


class CachedDataset(torch.utils.data.Dataset):
    """Samples ``[start, stop)`` of the cache at ``root``; ``__getitem__`` returns a Sample."""

    def __init__(self, root: str | Path, verify: str = "checksum", start: int = 0,
                 stop: Optional[int] = None, with_attrs: bool = False, decoder: str = "auto") -> None:
        self.root = Path(root).expanduser()
        self.manifest = Manifest.load(self.root)
        self.manifest.verify(self.root, verify)  # type: ignore[arg-type]
        m = self.manifest
        # decoder: data.decoder (dodo/data/decode.py); JPEGs decode to the cache's image size.
        self.readers = [ShardReader(m.shard_path(self.root, s), m.store, decoder, m.image_size)  # type: ignore[arg-type]
                        for s in m.shards]
        # offsets[k] = index of shard k's first caption; the last entry is the total.
        self.offsets = np.concatenate([[0], np.cumsum([s.captions for s in m.shards])]).tolist()
        # rows[k] = global index of shard k's first sample row (= image id in image caches).
        self.rows = np.concatenate([[0], np.cumsum([s.samples for s in m.shards])]).tolist()
        total = self.offsets[-1]
        stop = total if stop is None else stop
        if not 0 <= start < stop <= total:
            raise CacheError(f"samples [{start}, {stop}) are outside cache {self.root} of {total} samples")
        self.start, self.stop = start, stop
        # Shapes attributes are parsed for synthetic caches only: nothing else knows them.
        self.with_attrs = with_attrs and m.synthetic

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def classnames(self) -> list[str]:
        return list(self.manifest.classnames)

    def _per_sample(self, values) -> np.ndarray:
        """(len(self),) int64 from ``values(k, reader, rows)``: shard k's value for each of its
        samples in range, ``rows`` being their image rows in that shard. No image is decoded."""
        out = np.empty(len(self), np.int64)
        for k, reader in enumerate(self.readers):
            lo, hi = max(self.offsets[k], self.start), min(self.offsets[k + 1], self.stop)
            if lo < hi:
                reader.open()
                rows = reader.caption_image[lo - self.offsets[k]:hi - self.offsets[k]]
                out[lo - self.start:hi - self.start] = values(k, reader, rows)
        return out

    def image_ids(self) -> np.ndarray:
        """(len(self),) int64: the image id of every sample (-1 for a text cache)."""
        if self.manifest.modality == "text":
            return np.full(len(self), -1, np.int64)
        return self._per_sample(lambda k, reader, rows: rows.astype(np.int64) + self.rows[k])

    def image_start(self, i: int) -> int:
        """The index of the first sample (caption) of the image that sample ``i`` belongs to."""
        if i >= len(self):
            return len(self)
        shard, j = self.locate(i)
        reader = self.readers[shard]
        reader.open()
        first = int(np.searchsorted(reader.caption_image, reader.caption_image[j], side="left"))
        return max(0, self.offsets[shard] + first - self.start)

    def labels(self) -> np.ndarray:
        """(len(self),) int64: the class label of every sample (-1 without labels)."""
        return self._per_sample(lambda k, reader, rows: reader.labels[rows])

    def __len__(self) -> int:
        return self.stop - self.start

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, caption row in the shard) of sample ``i``."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples of {self.root}")
        g = self.start + i
        shard = bisect.bisect_right(self.offsets, g) - 1
        return shard, g - self.offsets[shard]

    def __getitem__(self, i: int) -> Sample:
        shard, j = self.locate(int(i))
        reader = self.readers[shard]
        reader.open()
        row = int(reader.caption_image[j])
        caption = reader.captions[j]
        key = reader.keys[row]
        first = int(np.searchsorted(reader.caption_image, row, side="left"))
        last = int(np.searchsorted(reader.caption_image, row, side="right"))
        if last - first > 1:
            key = f"{key}#{j - first}"
        attrs: dict[str, str] = {}
        if self.with_attrs:  # synthetic caches only (imported here: real data never loads it)
            from dodo.data.synthetic import caption_attributes
            attrs = {k: v for k, v in caption_attributes(caption).items() if v}
        text = self.manifest.modality == "text"
        tokens = np.asarray(reader.tokens[j], np.int32) if reader.tokens is not None else None
        return Sample(image=reader.image(row), caption=caption, key=key,
                      image_id=-1 if text else self.rows[shard] + row, label=int(reader.labels[row]),
                      attrs=attrs, tokens=tokens)

    def close(self) -> None:
        for r in self.readers:
            r.close()


# --- from the data config ---------------------------------------------------------------------

def build_datasets(cfg) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, eval) datasets for a DataConfig: synthetic in memory, or an HDF5 / zarr cache."""
    if cfg.kind == "synthetic":
        from dodo.data.synthetic import SyntheticShapes

        return (SyntheticShapes("train", cfg.num_train, cfg.image_size, cfg.seed),
                SyntheticShapes("eval", cfg.num_eval, cfg.image_size, cfg.seed))
    caches = {"train": cfg.train_cache, "eval": cfg.eval_cache}
    if cfg.synthetic_on_first_use:
        for split, path in caches.items():
            if path:
                ensure_synthetic_cache(cfg, split, Path(path).expanduser())
    dec = getattr(cfg, "decoder", "auto")
    train = CachedDataset(cfg.train_cache, cfg.verify, decoder=dec)
    _check_matches(cfg, train, "train_cache")
    if cfg.eval_cache:
        evals = CachedDataset(cfg.eval_cache, cfg.verify, with_attrs=True, decoder=dec)
        _check_matches(cfg, evals, "eval_cache")
        return train, evals
    n = len(train)
    if cfg.num_eval >= n:
        raise CacheError(f"data.num_eval={cfg.num_eval} leaves no training samples in {cfg.train_cache} "
                         f"({n} samples); lower data.num_eval or set data.eval_cache")
    # Cut at an image boundary: all captions of an image go to one side (no image is both
    # trained on and evaluated; retrieval sees every caption of its images).
    cut = train.image_start(n - cfg.num_eval)
    if cut == 0:
        raise CacheError(f"data.num_eval={cfg.num_eval} holds out every image of {cfg.train_cache}; "
                         "lower data.num_eval or set data.eval_cache")
    return (CachedDataset(cfg.train_cache, "none", 0, cut, decoder=dec),
            CachedDataset(cfg.train_cache, "none", cut, n, with_attrs=True, decoder=dec))


def _check_matches(cfg, ds: CachedDataset, key: str) -> None:
    m = ds.manifest
    if m.store != cfg.kind:
        raise CacheError(f"data.{key}={ds.root} is a {m.store} cache but data.kind={cfg.kind}; "
                         f"set data.kind={m.store}")
    if m.image_size != cfg.image_size and m.modality != "text":  # a text cache has no images
        raise CacheError(f"data.{key}={ds.root} holds {m.image_size} px images but data.image_size="
                         f"{cfg.image_size}; set data.image_size={m.image_size} (and the model's "
                         "image_encoder.image_size to match)")


def synthetic_options(cfg, split: str, out: Path):
    from dodo.data.cache import CacheOptions

    return CacheOptions(source="synthetic", src=split, out=str(out), store=cfg.kind, encode=cfg.encode,
                        image_size=cfg.image_size, resize="stretch",
                        samples_per_shard=cfg.samples_per_shard, workers=1,
                        num=cfg.num_train if split == "train" else cfg.num_eval, seed=cfg.seed)


def ensure_synthetic_cache(cfg, split: str, out: Path) -> None:
    """Build the synthetic cache at ``out`` unless it exists; refuse one built differently.

    Several ranks (and nodes) may get here at once: each takes a lock file beside ``out``
    (flock; on file systems without it the build still goes to a private temporary folder
    renamed into place, so the loser of a race throws its copy away).
    """
    from dodo.data.cache import build_cache

    opts = synthetic_options(cfg, split, out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                pass
            if not out.exists():
                tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.build-"))
                try:
                    opts.out = str(tmp)
                    started = time.perf_counter()
                    print(f"dodo: data cache {out} is missing: building it from the synthetic "
                          f"generator ({opts.num} {split} samples; first use only)", file=sys.stderr, flush=True)
                    build_cache(opts, log=lambda m: None)
                    umask = os.umask(0)
                    os.umask(umask)
                    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
                    os.replace(tmp, out)
                    print(f"dodo: built {out} in {time.perf_counter() - started:.1f} s", file=sys.stderr,
                          flush=True)
                except OSError:
                    if not out.exists():
                        raise
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp)
    opts.out = str(out)
    manifest = Manifest.load(out)
    if manifest.options != opts.identity():
        from dodo.data.cache import _diff
        raise CacheError(f"data cache {out} was built from other synthetic settings "
                         f"({_diff(manifest.options, opts.identity())}); point data.{split}_cache at "
                         "another folder or delete this one to rebuild it")
