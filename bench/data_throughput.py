"""Data loader throughput: samples/s to the batch the training loop consumes, several storages.

Two image sets of N 256 px images with captions, each stored as

  (a) loose JPEG files + captions.csv, read with PIL (the baseline)
  (b) webdataset tars, read with the `webdataset` library (decode "rgb8", i.e. PIL)
  (c) dodo HDF5, JPEG bytes (data.decoder=auto)   (d) dodo HDF5, raw uint8 arrays
  (e) dodo zarr v3, JPEG bytes (sharding codec, data.decoder=auto)

  shapes: the synthetic shapes generator at 64 px, upscaled bicubic (smooth, ~9 KB JPEGs)
  photo:  CC3M-like: gradients + multi-scale value noise + grain (photo-like JPEG sizes, ~21 KB at quality 90)

Batches are what the trainer gets now (dodo.data.collate.for_training): (B, 3, 256, 256) uint8
images + token ids + mask; the device normalises (dodo/data/device.py). Also measured:

- decoders: single-core decode rate of each data.decoder on in-memory JPEG bytes, at the stored
  size and with a 128 px target (draft-mode / DCT-scaled decode);
- per-core bounds: decode only (the loader's decoder, bytes in memory) for JPEG loaders, and a
  memcpy of one image from the page-cache-mapped file for raw; each loader's 0-worker rate is
  reported as a percentage of its bound (one core does everything at 0 workers).

Rounds interleave every cell, so each ratio is measured side by side in the same round; tables
give the median and [min-max] over rounds, and the load average (the machine may be shared:
then every figure is an upper bound on what a loaded core gets, and ratios are what to read).

    python bench/data_throughput.py                        # ~10 min; data prepared once in --workdir
    python bench/data_throughput.py --num 1000 --seconds 2 --rounds 2    # quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dodo.data.cache import CacheOptions, build_cache
from dodo.data.collate import CaptionCollator, for_training
from dodo.data.dataset import CachedDataset
from dodo.data.decode import available, decode, resolve
from dodo.data.sampler import GlobalBatchSampler
from dodo.data.synthetic import Sample, SyntheticShapes
from dodo.data.tokenizer import BUILTIN_SYNTHETIC, load_tokenizer

PER_TAR = 1000
LOADERS = {"loose": "(a) loose JPEG + PIL", "webdataset": "(b) webdataset tars",
           "hdf5_jpeg": "(c) dodo HDF5 jpeg", "hdf5_raw": "(d) dodo HDF5 raw", "zarr_jpeg": "(e) dodo zarr jpeg"}
FOLDERS = {"loose": "loose", "webdataset": "wds", "hdf5_jpeg": "hdf5_jpeg", "hdf5_raw": "hdf5_raw",
           "zarr_jpeg": "zarr_jpeg"}


# --- image sets ---------------------------------------------------------------------------------

def photo_like(i: int, size: int) -> np.ndarray:
    """A CC3M-like 256 px photo: lit gradients, multi-scale value noise (texture at several
    frequencies, as foliage / fabric / sky give), a few soft blobs, sensor grain. Its JPEG size at
    quality 90 (~21 KB) is in the range of CC3M photos at 256 px, unlike the smooth shapes (~9 KB)."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(-1, 1, 3)
        img[..., c] = 110 + 70 * (a * x + b * y) + 25 * np.sin(6.28 * (x * rng.uniform(0.5, 3) + ph))
    for cells in (4, 16, 64, 128):  # value noise at four scales, bilinear upsampled
        grid = rng.normal(0, 1, (cells + 1, cells + 1, 3)).astype(np.float32)
        up = np.asarray(Image.fromarray(((grid - grid.min()) / np.ptp(grid) * 255).astype(np.uint8))
                        .resize((size, size), Image.Resampling.BILINEAR), np.float32) - 128
        img += up * {4: 0.5, 16: 0.35, 64: 0.3, 128: 0.25}[cells]
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - 0.6 * mask) + 0.6 * mask * rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)  # grain
    return np.clip(img, 0, 255).astype(np.uint8)


WORDS = ["a", "photo", "of", "the", "view", "with", "trees", "and", "sky", "near", "city", "street",
         "people", "walking", "on", "beach", "at", "sunset", "old", "house", "in", "winter"]


def _jpeg(args: tuple[str, int, int, int]) -> tuple[int, bytes, str]:
    kind, i, num, size = args
    if kind == "shapes":
        s = SyntheticShapes("train", num, 64, 1234)[i]
        img, caption = np.asarray(Image.fromarray(s.image).resize((size, size), Image.Resampling.BICUBIC)), s.caption
    else:
        img = photo_like(i, size)
        rng = np.random.default_rng(10_000 + i)
        caption = " ".join(rng.choice(WORDS, rng.integers(5, 12)))
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return i, out.getvalue(), caption


def prepare(work: Path, kind: str, num: int, size: int) -> None:
    loose = work / "loose"
    if not (loose / "captions.csv").exists():
        print(f"preparing {num} {kind} JPEGs of {size} px in {work} ...", file=sys.stderr, flush=True)
        (loose / "img").mkdir(parents=True, exist_ok=True)
        rows = []
        with multiprocessing.get_context("fork").Pool(2) as pool:
            for i, data, caption in pool.imap(_jpeg, [(kind, i, num, size) for i in range(num)], chunksize=32):
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
    for name, store, encode, image_size in (("hdf5_jpeg", "hdf5", "jpeg", size), ("hdf5_raw", "hdf5", "raw", size),
                                            ("zarr_jpeg", "zarr", "jpeg", size)):
        build_cache(CacheOptions(source="folder", src=str(loose / "captions.csv"), out=str(work / name),
                                 store=store, encode=encode, image_size=image_size,
                                 samples_per_shard=5000, workers=2), log=lambda m: None)


# --- loaders ------------------------------------------------------------------------------------

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
    extra = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    if kind == "webdataset":
        import webdataset as wds

        urls = [str(p) for p in sorted((work / "wds").glob("*.tar"))]
        ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
              .decode("rgb8").to_tuple("jpg", "txt", "__key__").map(_wds_sample)
              .batched(batch, collation_fn=collate, partial=False))
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                           multiprocessing_context=ctx, **extra)
    ds = LooseFiles(work / "loose") if kind == "loose" else CachedDataset(work / kind, verify="none", decoder="auto")
    sampler = GlobalBatchSampler(len(ds), batch, 0, 1, seed=0, max_steps=steps, block=256, window=8)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                       multiprocessing_context=ctx, **extra)


def warm(folder: Path) -> None:
    """Read every file once, so each cell starts from a warm page cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def measure(kind: str, work: Path, workers: int, batch: int, seconds: float, num: int) -> float:
    warm(work / FOLDERS[kind])
    collate = for_training(CaptionCollator(load_tokenizer(BUILTIN_SYNTHETIC), 16))  # uint8 batches
    it = iter(loader(kind, work, workers, batch, collate, num // batch))
    for _ in range(2 + workers):  # warm-up: worker start, first opens
        next(it)
    done, started = 0, time.perf_counter()
    for b in it:
        assert b["images"].dtype == torch.uint8 and b["images"].shape[1] == 3
        done += b["images"].shape[0]
        if time.perf_counter() - started > seconds:
            break
    rate = done / (time.perf_counter() - started)
    del it
    return rate


# --- single-core bounds -------------------------------------------------------------------------

def _rate(fn, items: list, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for x in items:
            fn(x)
        done += len(items)
    return done / (time.perf_counter() - started)


def bounds(work: Path, seconds: float, size: int) -> dict[str, float]:
    """Samples/s of one core doing only the unavoidable work of each loader."""
    files = sorted((work / "loose" / "img").glob("*.jpg"))[:200]
    blobs = [f.read_bytes() for f in files]
    out = {f"decode:{name}": _rate(lambda b, n=name: decode(b, 0, n), blobs, seconds)
           for name in available()}
    out.update({f"decode_half:{name}": _rate(lambda b, n=name: decode(b, size // 2, n), blobs, seconds)
                for name in available()})
    ds = CachedDataset(work / "hdf5_raw", verify="none")
    reader = ds.readers[0]
    reader.open()
    dst = np.empty((size, size, 3), np.uint8)
    rows = list(range(min(200, len(reader))))
    out["memcpy"] = _rate(lambda r: np.copyto(dst, reader.encoded(r)), rows, seconds)
    out["jpeg_kb"] = float(np.mean([len(b) for b in blobs]) / 1024)
    return out


# --- report -------------------------------------------------------------------------------------

def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}-{max(xs):,.0f}]"


def medx(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f}x [{min(xs):.1f}-{max(xs):.1f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=4000, help="images per set")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sets", nargs="+", default=["shapes", "photo"], choices=["shapes", "photo"])
    p.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dodo_bench_data"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    for s in args.sets:
        prepare(args.workdir / s, s, args.num, args.size)
    loads = [os.getloadavg()[0]]
    bound = {s: bounds(args.workdir / s, 1.0, args.size) for s in args.sets}
    res = {s: {k: {w: [] for w in args.workers} for k in args.loaders} for s in args.sets}
    for rnd in range(args.rounds):
        for s in args.sets:
            for k in args.loaders:
                for w in args.workers:
                    r = measure(k, args.workdir / s, w, args.batch, args.seconds, args.num)
                    res[s][k][w].append(r)
                    loads.append(os.getloadavg()[0])
                    print(f"round {rnd} {s:6} {LOADERS[k]:24} workers={w}: {r:8.0f} samples/s "
                          f"(load {loads[-1]:.1f})", file=sys.stderr, flush=True)
        for s in args.sets:  # bounds re-measured each round too: they feel the same load
            b = bounds(args.workdir / s, 1.0, args.size)
            bound[s] = {key: max(bound[s][key], v) for key, v in b.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n{args.num} images per set, {args.size} px, batch {args.batch}, {args.rounds} interleaved rounds of "
          f"{args.seconds:g} s per cell: median [min-max]; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); load average {min(loads):.1f}-{max(loads):.1f} "
          f"during the run; commit {commit}; {time.strftime('%Y-%m-%d')}; decoder auto = {resolve('auto')}")
    for s in args.sets:
        b = bound[s]
        print(f"\n**{s}** (mean JPEG {b['jpeg_kb']:.1f} KB): single-core decode samples/s, bytes in memory\n")
        print("| decoder | stored size | 128 px target (draft / DCT-scaled) |\n|---|---:|---:|")
        for name in available():
            print(f"| {name} | {b[f'decode:{name}']:,.0f} | {b[f'decode_half:{name}']:,.0f} |")
        print(f"\n**{s}**: samples/s to the training batch (uint8 images + token ids); x = vs (a) in the "
              "same round; % = the 0-worker rate against the loader's single-core bound\n")
        print("| loader | " + " | ".join(f"{w} workers" for w in args.workers) + " | x (a), 0 workers | bound | % of bound |")
        print("|---|" + "---:|" * (len(args.workers) + 3))
        auto = f"decode:{resolve('auto')}"
        for k in args.loaders:
            cells = [med(res[s][k][w]) for w in args.workers]
            w0 = args.workers[0]
            ratio = medx([a / b0 for a, b0 in zip(res[s][k][w0], res[s]["loose"][w0])]) if "loose" in res[s] else "-"
            bkey = {"loose": "decode:pil", "webdataset": "decode:pil", "hdf5_raw": "memcpy"}.get(k, auto)
            pct = statistics.median(res[s][k][w0]) / b[bkey] * 100
            print(f"| {LOADERS[k]} | " + " | ".join(cells) + f" | {ratio} | {bkey} {b[bkey]:,.0f} | {pct:.0f}% |")
        if {"hdf5_jpeg", "webdataset"} <= set(args.loaders):
            for w in args.workers:
                r = [a / b0 for a, b0 in zip(res[s]["hdf5_jpeg"][w], res[s]["webdataset"][w])]
                print(f"\nHDF5 jpeg / webdataset, {w} workers: {medx(r)}", end="")
            print()
    if args.json:
        args.json.write_text(json.dumps({"results": res, "bounds": bound, "loads": loads}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
