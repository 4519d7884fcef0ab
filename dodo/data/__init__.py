"""Data: the synthetic generator, ingest of real sources into an HDF5 / zarr shard cache, the
cached dataset, and the resumable distributed sampler. See docs/data.md."""

from __future__ import annotations


def build_datasets(cfg):
    """(train, eval) datasets for a :class:`dodo.data.config.DataConfig` (imports lazily)."""
    from dodo.data.dataset import build_datasets as build

    return build(cfg)
