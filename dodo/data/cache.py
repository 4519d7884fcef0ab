"""`dodo data cache`: a source -> shards + manifest, resumable, in parallel, skipping bad samples.

Layout of a cache directory::

    DIR/build.json           the build options, written first (a rerun must match them)
    DIR/shards/shard-00000.h5           (or .zarr/) one shard per `samples_per_shard` source items
    DIR/shards/shard-00000.h5.done.json its record: counts, size, sha256, skipped samples
    DIR/bad_samples.jsonl    every skipped sample: key, where, reason, detail
    DIR/manifest.json        written last: its presence means the cache is complete

Shard ``k`` holds source items ``[k * S, (k + 1) * S)`` minus the bad ones, so it can be
rebuilt on its own. A rerun keeps every shard whose record exists and whose checksum still
matches, and builds the rest; a shard is written to a temporary name and renamed only when
complete, and its record is written after the rename.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dodo import __version__
from dodo.data.ingest import SOURCE_KINDS, Item, Loaded, Source, SourceError, open_source
from dodo.data.ingest.images import RESIZE_MODES, BadSample, check_caption, prepare, prepare_array
from dodo.data.manifest import MANIFEST, REPORT, SHARDS, CacheError, Manifest, ShardInfo
from dodo.data.store import SUFFIX, ShardWriter, checksum, shard_bytes, shard_name
from dodo.rundir import write_atomic, write_json_atomic

BUILD = "build.json"


@dataclass
class CacheOptions:
    source: str  # a name in dodo.data.ingest.SOURCES: webdataset | coco | karpathy | cifar | ...
    src: str
    out: str
    store: str = "hdf5"
    encode: str = "jpeg"
    image_size: int = 256  # 0: keep the source size (jpeg only)
    resize: str = "center-crop"
    samples_per_shard: int = 5000
    workers: int = 1
    images: Optional[str] = None  # coco / cc3m / folder: the image folder
    num: int = 0  # synthetic: samples
    seed: int = 1234  # synthetic
    tokenizer: str = ""  # pre-tokenise captions with this tokenizer spec ("" = no)
    # Added with labels and unimodal sources; left out of identity() at their defaults, so
    # caches built before them still match their options.
    split: str = ""  # karpathy: train|restval|val|test (comma list); cifar: train|test
    classnames: str = ""  # folder / cifar / labels: a class-names file
    block: int = 0  # text: cut the token stream into blocks of this many tokens (0: lines)
    dataset: str = ""  # the manifest's dataset name when the source cannot tell (imagenet1k, ...)
    min_count: int = 0  # vqa: answers given fewer times leave the vocabulary (0: the standard 9)

    def check(self) -> None:
        if self.source not in SOURCE_KINDS:
            raise SourceError(f"--from {self.source!r} is not a source format; use one of "
                              f"{', '.join(SOURCE_KINDS)}")
        if self.store not in SUFFIX:
            raise SourceError(f"--store {self.store!r}: use hdf5 or zarr")
        if self.encode not in ("jpeg", "raw"):
            raise SourceError(f"--encode {self.encode!r}: use jpeg or raw")
        if self.encode == "raw" and self.image_size <= 0:
            raise SourceError("--encode raw stores fixed-size arrays: give --image-size N (e.g. 256)")
        if self.resize not in RESIZE_MODES:
            raise SourceError(f"--resize {self.resize!r}: use one of {', '.join(RESIZE_MODES)}")
        if self.samples_per_shard < 1:
            raise SourceError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.workers < 0:
            raise SourceError(f"--workers must be >= 0, got {self.workers}")
        if self.block < 0:
            raise SourceError(f"--block must be >= 0, got {self.block}")
        if self.min_count < 0:
            raise SourceError(f"--min-count must be >= 0, got {self.min_count}")
        if self.block and not self.tokenizer:
            raise SourceError("--block N cuts text into token blocks: give --tokenizer (a local "
                              "tokenizer.json or folder) too")

    def identity(self) -> dict[str, Any]:
        """What a rerun must match to reuse finished shards (workers and out may differ)."""
        d = asdict(self)
        for k in ("workers", "out"):
            d.pop(k)
        for k, default in _LATER_DEFAULTS.items():
            if d[k] == default:
                d.pop(k)
        return d


_LATER_DEFAULTS: dict[str, Any] = {"split": "", "classnames": "", "block": 0, "dataset": "", "min_count": 0}


@dataclass
class ShardResult:
    info: ShardInfo
    bad: list[dict[str, str]]
    seconds: float


# --- one shard, in a worker -----------------------------------------------------------------

_TOKENIZERS: dict[str, Any] = {}


def _tokenize(spec: str, captions: list[str]) -> list[list[int]]:
    if spec not in _TOKENIZERS:
        from dodo.data.tokenizer import load_tokenizer
        _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec](captions, add_special_tokens=False)["input_ids"]


def build_shard(source: Source, opts: CacheOptions, index: int, items: list[Item]) -> ShardResult:
    started = time.perf_counter()
    shards = Path(opts.out) / SHARDS
    final = shards / shard_name(index, opts.store)
    tmp = final.with_name(final.name + ".tmp")
    _remove(tmp)
    writer = ShardWriter(tmp, opts.store, opts.encode, len(items), opts.image_size, opts.tokenizer,
                         source.modality)
    bad: list[dict[str, str]] = []
    for item in items:
        try:
            loaded = source.load(item)
            loaded = loaded if isinstance(loaded, Loaded) else Loaded(*loaded)
            if source.modality == "image":
                captions = [""]  # one empty caption row per image: a sample is an image
            else:
                captions = _good_captions(item, loaded.captions, bad)
            image = loaded.image
            if source.modality == "text":
                stored = None
            elif isinstance(image, (bytes, bytearray)):
                stored = prepare(bytes(image), opts.image_size, opts.resize, opts.encode)
            else:
                stored = prepare_array(image, opts.image_size, opts.resize, opts.encode)
            tokens = loaded.tokens
            if tokens is None and opts.tokenizer and source.modality != "image":
                tokens = _tokenize(opts.tokenizer, captions)
        except BadSample as b:
            bad.append({"key": item.key, "where": item.where, "reason": b.reason, "detail": b.detail})
            continue
        except Exception as err:  # an unforeseen failure of one sample must not stop the job
            bad.append({"key": item.key, "where": item.where, "reason": "unreadable sample",
                        "detail": f"{type(err).__name__}: {err}"})
            continue
        writer.add(item.key, stored, captions, tokens, loaded.label)
    writer.close({"source": source.kind, "shard": index, "dodo_version": __version__})
    info = ShardInfo(final.name, len(writer.keys), len(writer.captions), shard_bytes(tmp),
                     checksum(tmp), len(bad))
    _remove(final)
    os.replace(tmp, final)
    write_json_atomic(_record_path(final), {"info": asdict(info), "bad": bad})
    return ShardResult(info, bad, time.perf_counter() - started)


def _good_captions(item: Item, raw: list, bad: list[dict[str, str]]) -> list[str]:
    """The clean captions of one image. A bad caption among good ones is dropped and reported
    as ``<key>#<j>``; an image with no good caption is a bad sample."""
    good, problems = [], []
    for j, c in enumerate(raw):
        try:
            good.append(check_caption(c))
        except BadSample as b:
            problems.append((j, b))
    if not raw:
        raise BadSample("missing caption", "no caption for this image")
    if not good:
        raise problems[0][1]
    for j, b in problems:
        bad.append({"key": f"{item.key}#{j}", "where": item.where, "reason": b.reason, "detail": b.detail})
    return good


def _record_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".done.json")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _kept(path: Path) -> Optional[ShardResult]:
    """A finished shard from an earlier run, if its record and checksum still hold."""
    record = _record_path(path)
    if not (record.exists() and path.exists()):
        return None
    try:
        data = json.loads(record.read_text())
        info = ShardInfo(**data["info"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if shard_bytes(path) != info.bytes or checksum(path) != info.sha256:
        return None
    return ShardResult(info, data["bad"], 0.0)


# --- the whole cache --------------------------------------------------------------------------

def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def build_cache(opts: CacheOptions, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
                ) -> Manifest:
    """Build (or finish) the cache described by ``opts``; returns its manifest."""
    opts.check()
    out = Path(opts.out).expanduser()
    source = open_source(opts.source, opts.src, images=opts.images, num=opts.num, seed=opts.seed,
                         image_size=opts.image_size, split=opts.split, classnames=opts.classnames,
                         block=opts.block, tokenizer=opts.tokenizer, dataset=opts.dataset,
                         min_count=opts.min_count)
    if (out / MANIFEST).exists():
        manifest = Manifest.load(out)
        if manifest.options != opts.identity():
            raise CacheError(f"{out} already holds a complete cache built with other options "
                             f"({_diff(manifest.options, opts.identity())}); choose a new --out or delete it")
        log(f"dodo: {out} is already complete ({manifest.num_samples} samples); nothing to do")
        return manifest
    if out.exists() and not (out / BUILD).exists() and any(out.iterdir()):
        raise CacheError(f"--out {out} exists and is not a dodo cache; choose an empty or new folder")
    items = source.items()  # before writing anything: a bad SRC leaves no trace
    if not items:
        raise SourceError(f"{opts.src} holds no samples for --from {opts.source}")
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    if (out / BUILD).exists():
        previous = json.loads((out / BUILD).read_text())
        if previous != opts.identity():
            raise CacheError(f"{out} holds an unfinished build with other options "
                             f"({_diff(previous, opts.identity())}); rerun with the same options to "
                             "finish it, or delete the folder")
    else:
        write_json_atomic(out / BUILD, opts.identity())

    per = opts.samples_per_shard
    plan = [items[lo:lo + per] for lo in range(0, len(items), per)]
    results: dict[int, ShardResult] = {}
    for k in range(len(plan)):
        kept = _kept(out / SHARDS / shard_name(k, opts.store))
        if kept is not None:
            results[k] = kept
    todo = [k for k in range(len(plan)) if k not in results]
    log(f"dodo: caching {len(items)} {opts.source} samples from {opts.src} into {len(plan)} "
        f"{opts.store} shards in {out}" + (f"; {len(results)} finished shards kept (checksums ok)"
                                           if results else ""))
    started, done_items, total_items = time.perf_counter(), 0, sum(len(plan[k]) for k in todo)
    last_log = 0.0

    def progress(k: int, result: ShardResult) -> None:
        nonlocal done_items, last_log
        results[k] = result
        done_items += len(plan[k])
        now = time.perf_counter() - started
        if now - last_log > 2.0 or done_items == total_items:
            rate = done_items / max(now, 1e-9)
            eta = (total_items - done_items) / max(rate, 1e-9)
            log(f"dodo: shards {len(results)}/{len(plan)}  {done_items}/{total_items} samples  "
                f"{rate:.0f} samples/s  ETA {_fmt_time(eta)}")
            last_log = now

    if opts.workers <= 1 or len(todo) <= 1:
        for k in todo:
            progress(k, build_shard(source, opts, k, plan[k]))
    else:
        # fork: workers inherit the listed source; no HDF5 file is open in this process.
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=opts.workers, mp_context=ctx) as pool:
            futures = {pool.submit(build_shard, source, opts, k, plan[k]): k for k in todo}
            for fut in as_completed(futures):
                progress(futures[fut], fut.result())
    return _finish(out, opts, source, plan, results, log)


def _finish(out: Path, opts: CacheOptions, source: Source, plan: list, results: dict[int, ShardResult],
            log: Callable[[str], None]) -> Manifest:
    bad = [{"key": k, "where": w, "reason": r, "detail": d} for k, w, r, d in source.listing_bad]
    for k in range(len(plan)):
        bad += results[k].bad
    counts: dict[str, int] = {}
    for b in bad:
        counts[b["reason"]] = counts.get(b["reason"], 0) + 1
    write_atomic(out / REPORT, "".join(json.dumps(b) + "\n" for b in bad))
    shards = [results[k].info for k in range(len(plan))]
    meta = source.meta()
    num_samples = sum(s.samples for s in shards)
    num_captions = sum(s.captions for s in shards)
    images = 0 if meta["modality"] == "text" else num_samples
    manifest = Manifest(store=opts.store, encode=opts.encode, image_size=opts.image_size,
                        source=source.describe(), options=opts.identity(), shards=shards,
                        num_samples=num_samples, num_captions=num_captions,
                        bad=dict(sorted(counts.items())), dodo_version=__version__,
                        num_images=images,
                        captions_per_image=(num_captions / images if images and meta["modality"] ==
                                            "image_text" else 0.0),
                        tokenizer=(tokenizer_facts(opts.tokenizer) if opts.tokenizer and
                                   meta["modality"] != "image" else {}), **meta)
    if manifest.num_samples == 0:
        raise CacheError(f"every sample of {opts.src} was bad ({_counts(counts)}); see {out / REPORT}")
    for name, table in source.tables().items():  # e.g. VQA's questions: before the manifest (= complete)
        write_atomic(out / name, json.dumps(table, separators=(",", ":")) + "\n")
    manifest.save(out)
    log(f"dodo: cache {out} complete: {manifest.num_samples} samples, {manifest.num_captions} captions, "
        f"{len(shards)} shards; skipped {len(bad)} bad samples" +
        (f" ({_counts(counts)}; listed in {out / REPORT})" if bad else ""))
    return manifest


def tokenizer_facts(spec: str) -> dict[str, Any]:
    """{name_or_path, vocab_size, sha256} of the tokenizer the stored token ids came from; the
    sha256 is of its tokenizer.json, so a run can tell a changed file with the same name."""
    import hashlib

    from dodo.data.tokenizer import asset_path

    tok = _TOKENIZERS.get(spec)
    if tok is None:
        from dodo.data.tokenizer import load_tokenizer
        tok = _TOKENIZERS[spec] = load_tokenizer(spec)
    path = asset_path() if spec.startswith("builtin:") else Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return {"name_or_path": spec, "vocab_size": len(tok), "sha256": digest}


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys)
