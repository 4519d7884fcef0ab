"""The cached dataset: DataLoader workers read HDF5 / zarr after a fork, damaged shards are named,
and the data config builds (or refuses) caches."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import dodo
from dodo.config.errors import ConfigValueError
from dodo.data import build_datasets
from dodo.data.cache import CacheOptions, build_cache
from dodo.data.config import DataConfig
from dodo.data.dataset import CachedDataset
from dodo.data.manifest import CacheError, Manifest
from dodo.data.sampler import GlobalBatchSampler
from dodo.data.store import ShardError
from dodo.data.synthetic import Sample, SyntheticShapes

N = 96


def synthetic_cache(out: Path, store: str = "hdf5", encode: str = "raw", num: int = N) -> Path:
    build_cache(CacheOptions(source="synthetic", src="train", out=str(out), store=store, encode=encode,
                             image_size=32, samples_per_shard=20, num=num), log=lambda m: None)
    return out


def _as_list(batch: list[Sample]) -> list[Sample]:
    return batch


@pytest.mark.parametrize("store,encode", [("hdf5", "raw"), ("hdf5", "jpeg"), ("zarr", "raw"), ("zarr", "jpeg")])
def test_dataloader_with_two_forked_workers(tmp_path: Path, store: str, encode: str) -> None:
    ds = CachedDataset(synthetic_cache(tmp_path / "c", store, encode))
    ref = SyntheticShapes("train", N, 32, 1234)
    ds[5]  # the parent opens a shard first: the workers must not reuse that handle
    sampler = GlobalBatchSampler(len(ds), 16, 0, 1, seed=0, max_steps=N // 16, block=20, window=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=_as_list,
                                         multiprocessing_context=multiprocessing.get_context("fork"))
    got = [s for batch in loader for s in batch]
    assert sorted(s.key for s in got) == [f"train-{i:06d}" for i in range(N)]
    for s in got:
        r = ref[int(s.key[-6:])]
        assert s.caption == r.caption
        if encode == "raw":
            assert np.array_equal(s.image, r.image)
        else:  # JPEG at quality 90: close, not equal
            assert np.abs(s.image.astype(int) - r.image).mean() < 8
    ds[6]  # and the parent's handle still works afterwards
    ds.close()


def test_flipped_bytes_are_named_by_checksum(tmp_path: Path) -> None:
    root = synthetic_cache(tmp_path / "c")
    shard = root / "shards" / "shard-00002.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00002\.h5 fails its sha256 checksum") as err:
        CachedDataset(root)
    assert "shard-00001" not in str(err.value)
    proc = dodo("data", "verify", str(root), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "shard-00002.h5 fails its sha256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_damaged_header_without_checksum_names_the_shard(tmp_path: Path) -> None:
    root = synthetic_cache(tmp_path / "c")
    shard = root / "shards" / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[0:64] = b"\0" * 64  # the HDF5 superblock
    shard.write_bytes(bytes(data))
    ds = CachedDataset(root, verify="size")  # same size: only reading finds it
    assert ds[30].key == "train-000030"  # other shards still read
    with pytest.raises(ShardError, match=r"shard .*shard-00000\.h5 cannot be read.*dodo data verify"):
        ds[3]


def test_verify_passes_on_a_good_cache(tmp_path: Path) -> None:
    root = synthetic_cache(tmp_path / "c", "zarr", "jpeg")
    proc = dodo("data", "verify", str(root), cwd=tmp_path)
    assert "5 shards, 96 samples: all checksums match" in proc.stdout


def _config(tmp_path: Path, **kw) -> DataConfig:
    base = dict(kind="hdf5", train_cache=str(tmp_path / "train"), eval_cache=str(tmp_path / "eval"),
                synthetic_on_first_use=True, num_train=64, num_eval=16, samples_per_shard=25)
    return DataConfig(**{**base, **kw})


def test_synthetic_cache_on_first_use(tmp_path: Path) -> None:
    train, evals = build_datasets(_config(tmp_path))
    assert (len(train), len(evals)) == (64, 16)
    assert Manifest.load(tmp_path / "train").options["num"] == 64
    assert np.array_equal(evals[3].image, SyntheticShapes("eval", 16, 32, 1234)[3].image)
    assert evals[3].attrs == SyntheticShapes("eval", 16, 32, 1234)[3].attrs  # for caption scoring
    assert not list(tmp_path.glob(".*build*"))
    again, _ = build_datasets(_config(tmp_path))  # reused, not rebuilt
    assert again.manifest.shards == train.manifest.shards
    with pytest.raises(CacheError, match=r"other synthetic settings \(num: 64 then, 32 now\).*data.train_cache"):
        build_datasets(_config(tmp_path, num_train=32))


def _build_in_process(cfg: DataConfig, queue) -> None:
    train, _ = build_datasets(cfg)
    queue.put(len(train))


def test_two_ranks_building_at_once_share_one_cache(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(_config(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [queue.get(), queue.get()] == [64, 64]


def test_held_out_split_and_mismatches(tmp_path: Path) -> None:
    synthetic_cache(tmp_path / "c", num=50)
    train, evals = build_datasets(DataConfig(kind="hdf5", train_cache=str(tmp_path / "c"), num_eval=10))
    assert (len(train), len(evals)) == (40, 10)
    assert evals[0].key == "train-000040" and train[39].key == "train-000039"
    with pytest.raises(CacheError, match="is a hdf5 cache but data.kind=zarr; set data.kind=hdf5"):
        build_datasets(DataConfig(kind="zarr", train_cache=str(tmp_path / "c")))
    with pytest.raises(CacheError, match="holds 32 px images but data.image_size=64"):
        build_datasets(DataConfig(kind="hdf5", train_cache=str(tmp_path / "c"), image_size=64))
    with pytest.raises(CacheError, match="num_eval=60 leaves no training samples"):
        build_datasets(DataConfig(kind="hdf5", train_cache=str(tmp_path / "c"), num_eval=60))
    with pytest.raises(CacheError, match="does not exist; build it with `dodo data cache"):
        build_datasets(DataConfig(kind="hdf5", train_cache=str(tmp_path / "nope")))
    with pytest.raises(ConfigValueError, match="set data.train_cache"):
        DataConfig(kind="zarr")
