"""Data loader throughput: samples/s to a training-ready batch, five ways of storing one data set.

The same N synthetic 256 px images with captions (the shapes generator at 64 px, upscaled
bicubic, JPEG quality 90) are stored as

  (a) loose JPEG files + captions.csv, read with PIL
  (b) webdataset tars, read with the `webdataset` library (decode "rgb8")
  (c) dodo HDF5, JPEG bytes          (d) dodo HDF5, raw uint8 arrays
  (e) dodo zarr v3, JPEG bytes (sharding codec)

and read through a torch DataLoader with 0 / 1 / 2 workers into what the trainer consumes:
CaptionCollator's (B, 3, 256, 256) float32 normalised images + token ids + attention mask.
(a), (c)-(e) use dodo's GlobalBatchSampler (shuffled, block-aware); (b) streams its tars in
order, as webdataset does. The data is prepared once in --workdir (kept between runs) and read
warm from the page cache: that isolates the loader; a cold parallel file system adds per-file
open latency, which hits (a) hardest.

    python bench/data_throughput.py                      # full run, prints a markdown table
    python bench/data_throughput.py --num 2000 --seconds 5   # quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dodo.data.cache import CacheOptions, build_cache
from dodo.data.collate import CaptionCollator
from dodo.data.dataset import CachedDataset
from dodo.data.sampler import GlobalBatchSampler
from dodo.data.synthetic import Sample, SyntheticShapes
from dodo.data.tokenizer import BUILTIN_SYNTHETIC, load_tokenizer

PER_TAR = 1000


# --- preparing the data once ----------------------------------------------------------------

def _jpeg(args: tuple[int, int, int]) -> tuple[int, bytes, str]:
    i, num, size = args
    s = SyntheticShapes("train", num, 64, 1234)[i]
    im = Image.fromarray(s.image).resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=90)
    return i, out.getvalue(), s.caption


def prepare(work: Path, num: int, size: int) -> None:
    loose = work / "loose"
    if not (loose / "captions.csv").exists():
        print(f"preparing {num} JPEGs of {size} px ...", file=sys.stderr, flush=True)
        (loose / "img").mkdir(parents=True, exist_ok=True)
        rows = []
        with multiprocessing.get_context("fork").Pool(2) as pool:
            for i, data, caption in pool.imap(_jpeg, [(i, num, size) for i in range(num)], chunksize=64):
                (loose / "img" / f"{i:06d}.jpg").write_bytes(data)
                rows.append((f"img/{i:06d}.jpg", caption))
        with open(loose / "tmp.csv", "w", newline="") as f:
            csv.writer(f).writerows([("file", "caption"), *rows])
        os.replace(loose / "tmp.csv", loose / "captions.csv")
    tars = work / "wds"
    if not (tars / "done").exists():
        import webdataset as wds

        tars.mkdir(exist_ok=True)
        rows = list(csv.DictReader(open(loose / "captions.csv")))
        for t in range(0, num, PER_TAR):
            with wds.TarWriter(str(tars / f"{t // PER_TAR:05d}.tar")) as sink:
                for r in rows[t:t + PER_TAR]:
                    sink.write({"__key__": Path(r["file"]).stem,
                                "jpg": (loose / r["file"]).read_bytes(), "txt": r["caption"]})
        (tars / "done").touch()
    for name, store, encode, image_size in (("hdf5_jpeg", "hdf5", "jpeg", 0), ("hdf5_raw", "hdf5", "raw", size),
                                            ("zarr_jpeg", "zarr", "jpeg", 0)):
        build_cache(CacheOptions(source="folder", src=str(loose / "captions.csv"), out=str(work / name),
                                 store=store, encode=encode, image_size=image_size,
                                 samples_per_shard=5000, workers=2), log=lambda m: None)


# --- the loaders ------------------------------------------------------------------------------

class LooseFiles(torch.utils.data.Dataset):
    def __init__(self, root: Path):
        self.root = root
        self.rows = list(csv.DictReader(open(root / "captions.csv")))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        r = self.rows[i]
        with Image.open(self.root / r["file"]) as im:
            image = np.asarray(im.convert("RGB"))
        return Sample(image=image, caption=r["caption"], key=r["file"])


def _wds_sample(x: tuple) -> Sample:
    image, caption, key = x
    return Sample(image=image, caption=caption, key=key)


def loader(kind: str, work: Path, workers: int, batch: int, collate, steps: int):
    ctx = multiprocessing.get_context("fork") if workers else None
    if kind == "webdataset":
        import webdataset as wds

        urls = [str(p) for p in sorted((work / "wds").glob("*.tar"))]
        ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
              .decode("rgb8").to_tuple("jpg", "txt", "__key__").map(_wds_sample)
              .batched(batch, collation_fn=collate, partial=False))
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                           multiprocessing_context=ctx)
    ds = LooseFiles(work / "loose") if kind == "loose" else CachedDataset(work / kind, verify="none")
    sampler = GlobalBatchSampler(len(ds), batch, 0, 1, seed=0, max_steps=steps, block=256, window=8)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       multiprocessing_context=ctx)


class Uint8Batch:
    """The same batch with images left as stacked (B, H, W, 3) uint8: the device transposes and
    normalises them in one kernel (as DALI / FFCV pipelines do); 4x fewer bytes to move."""

    def __init__(self, base: CaptionCollator):
        self.base = base

    def __call__(self, samples: list[Sample]) -> dict:
        input_ids, attention_mask = self.base.token_ids([s.caption for s in samples])
        return {"images": self.base.pixels(samples).permute(0, 2, 3, 1), "input_ids": input_ids,
                "attention_mask": attention_mask}


FOLDERS = {"loose": "loose", "webdataset": "wds", "hdf5_jpeg": "hdf5_jpeg", "hdf5_raw": "hdf5_raw",
           "zarr_jpeg": "zarr_jpeg"}


def warm(folder: Path) -> None:
    """Read every file once so each loader starts from a warm page cache (the 3.7 GB raw cache
    is otherwise partly on disk after the others ran)."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def measure(kind: str, work: Path, workers: int, batch: int, seconds: float, num: int, mode: str) -> float:
    warm(work / FOLDERS[kind])
    collate = CaptionCollator(load_tokenizer(BUILTIN_SYNTHETIC), 16)
    if mode == "uint8":
        collate = Uint8Batch(collate)
    steps = num // batch
    it = iter(loader(kind, work, workers, batch, collate, steps))
    for _ in range(2 + workers):  # warm-up: worker start, first opens
        next(it)
    done, started = 0, time.perf_counter()
    for b in it:
        assert b["images"].shape[1:] in ((3, 256, 256), (256, 256, 3))
        done += b["images"].shape[0]
        if time.perf_counter() - started > seconds:
            break
    rate = done / (time.perf_counter() - started)
    del it
    return rate


KINDS = {"loose": "(a) loose JPEG + PIL", "webdataset": "(b) webdataset tars",
         "hdf5_jpeg": "(c) dodo HDF5 jpeg", "hdf5_raw": "(d) dodo HDF5 raw", "zarr_jpeg": "(e) dodo zarr jpeg"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per cell and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all cells; each keeps its best")
    p.add_argument("--modes", nargs="+", default=["float", "uint8"], choices=["float", "uint8"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dodo_bench_data"))
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(1)
    prepare(args.workdir, args.num, args.size)
    sizes = {k: sum(f.stat().st_size for f in (args.workdir / d).rglob("*") if f.is_file())
             for k, d in FOLDERS.items()}
    # Rounds go over every cell in turn and each cell keeps its best round: on a shared machine
    # a load spike then costs one round of one cell, not a whole column.
    results: dict[str, dict[str, dict[int, float]]] = {
        mode: {kind: {w: 0.0 for w in args.workers} for kind in KINDS} for mode in args.modes}
    for rnd in range(args.rounds):
        for mode in args.modes:
            for kind in KINDS:
                for w in args.workers:
                    r = measure(kind, args.workdir, w, args.batch, args.seconds, args.num, mode)
                    results[mode][kind][w] = max(results[mode][kind][w], r)
                    print(f"round {rnd} {mode:6} {KINDS[kind]:24} workers={w}: {r:8.0f} samples/s "
                          f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\n{args.num} images of {args.size} px, batch {args.batch}, best of {args.rounds} rounds of "
          f"{args.seconds:g} s, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {load[0]:.1f} at the end")
    for mode in args.modes:
        what = ("float32 normalised images (CaptionCollator)" if mode == "float"
                else "uint8 images, normalised on the device")
        print(f"\nsamples/s to a batch of {what} + token ids (x = vs (a) with as many workers)\n")
        print("| loader | on disk | " + " | ".join(f"{w} workers" for w in args.workers) + " |")
        print("|---|---:|" + "---:|" * len(args.workers))
        base = results[mode]["loose"]
        for kind, label in KINDS.items():
            cells = [f"{results[mode][kind][w]:,.0f} ({results[mode][kind][w] / base[w]:.1f}x)"
                     for w in args.workers]
            print(f"| {label} | {sizes[kind] / 2**20:,.0f} MiB | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "sizes": sizes, "load": load}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
