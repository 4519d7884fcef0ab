"""Small real inputs for the data tests: images PIL encodes, tars webdataset writes, COCO JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(i: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small distinct image: a colour ramp seeded by i."""
    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, size=3)
    ramp = np.linspace(0, 60, size)[None, :, None]
    pixels = np.clip(base[None, None, :] + ramp + np.zeros((size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


CORRUPT = b"this is not an image at all" * 4


def write_webdataset(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def write_coco(root: Path, images: dict[int, bytes | None], captions: dict[int, list[str]]) -> Path:
    """COCO layout: root/annotations/captions_val.json + root/val/<file>; None = file not written."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    entries, anns, ann_id = [], [], 1
    for image_id, data in images.items():
        name = f"{image_id:012d}.jpg"
        if data is not None:
            (root / "val" / name).write_bytes(data)
        entries.append({"id": image_id, "file_name": name, "width": 24, "height": 24})
        for c in captions.get(image_id, []):
            anns.append({"id": ann_id, "image_id": image_id, "caption": c})
            ann_id += 1
    path = root / "annotations" / "captions_val.json"
    path.write_text(json.dumps({"info": {"description": "test"}, "licenses": [],
                                "images": entries, "annotations": anns}))
    return path


# --- real formats with natural-language captions, for ingest and end-to-end tests ------------
#
# Every writer uses the format's own tool where one exists (webdataset's TarWriter, pyarrow
# parquet as img2dataset writes it, json for the Karpathy / COCO files, PIL for JPEGs, pickle
# with bytes keys for CIFAR) and returns what a researcher would pass to `dodo data cache`.

import pickle

ADJECTIVES = ("young", "old", "small", "large", "happy", "brown", "tall", "busy")
SUBJECTS = ("man", "woman", "dog", "cat", "child", "bus", "horse", "bird", "girl", "boy", "train")
ACTIONS = ("riding a bike down", "walking along", "sitting on a bench in", "standing next to a car on",
           "running across", "waiting at", "looking at the sky above", "playing with a ball on")
PLACES = ("a city street", "the beach", "a grassy field", "a busy market", "a snowy hill",
          "the train station", "a quiet park", "the river bank")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_CYCLE = ("train", "train", "restval", "val", "test")  # Karpathy splits by image index
FLICKR_SPLIT_CYCLE = ("train", "train", "train", "val", "test")  # Flickr30k's Karpathy split has no restval
# Flickr30k-style captions (people in action, longer, other words than the COCO stand-in's).
FLICKR_PEOPLE = ("two young guys", "a little girl", "several men in hard hats", "a woman in a red jacket",
                 "an older man", "a group of kids", "a musician", "three friends")
FLICKR_VERBS = ("are climbing", "is jumping over", "are operating", "is painting", "is playing a guitar near",
                "are hiking toward", "is reading beside", "are dancing around")
FLICKR_PLACES = ("a wooden fence", "a giant pulley system", "a colorful mural", "a stone fountain",
                 "the mountain trail", "an outdoor stage", "a frozen lake", "the old church")


def caption(i: int, j: int = 0) -> str:
    """Natural caption j of image i, e.g. "a young man riding a bike down a city street"."""
    return (f"a {ADJECTIVES[(i + j) % len(ADJECTIVES)]} {SUBJECTS[i % len(SUBJECTS)]} "
            f"{ACTIONS[(i // len(SUBJECTS) + j) % len(ACTIONS)]} {PLACES[(i + 3 * j) % len(PLACES)]}")


def flickr_caption(i: int, j: int = 0) -> str:
    """Flickr30k-style caption j of image i, e.g. "two young guys are climbing a wooden fence"."""
    return (f"{FLICKR_PEOPLE[(i + j) % len(FLICKR_PEOPLE)]} {FLICKR_VERBS[(i + 2 * j) % len(FLICKR_VERBS)]} "
            f"{FLICKR_PLACES[(i // len(FLICKR_PEOPLE) + j) % len(FLICKR_PLACES)]}")


def flickr_image(i: int, size: int = 24) -> bytes:
    """A Flickr stand-in image: other pixels than :func:`image_bytes` (two vertical colour bands
    over a horizontal gradient, seeded apart from the COCO images), JPEG."""
    rng = np.random.default_rng([i, 30_000])
    top, bottom = rng.integers(0, 255, size=(2, 3))
    rows = np.where(np.arange(size)[:, None, None] < size // 2, top, bottom)  # (size, 1, 3)
    grad = np.linspace(-40, 40, size)[None, :, None]
    pixels = np.clip(rows + grad + np.zeros((size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def all_words() -> list[str]:
    """Every word the writers below can produce (captions, class names, corpus)."""
    words = {w for part in (ADJECTIVES, SUBJECTS, ACTIONS, PLACES, CIFAR10_NAMES, FLICKR_PEOPLE,
                            FLICKR_VERBS, FLICKR_PLACES) for p in part for w in p.split()}
    words |= {"a", "the", "and", "photo", "of", "an", "image", "class", "said", "then", "went", "home",
              "synonym", "superclass", ".", ",", "'", "-", "_"} | {str(d) for d in range(10)}
    for n in imagenet_names()[:100]:
        words.update(n.lower().replace("-", " ").replace("'", " ").split())
    return sorted(words)


def imagenet_names() -> list[str]:
    """ImageNet's 1000 class names as clip_benchmark ships them (its en_classnames.json)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("clip_benchmark")
    folder = spec.submodule_search_locations[0]  # read the JSON without importing the package
    with open(os.path.join(folder, "datasets", "en_classnames.json")) as f:
        return json.load(f)["imagenet1k"]


def class_image(label: int, i: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """An image whose colour depends on its class (so kNN / probes can learn it) plus noise."""
    base = np.random.default_rng([label, 99]).integers(30, 225, size=3)
    noise = np.random.default_rng([label, i]).normal(0, 12, size=(size, size, 3))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_karpathy(root: Path, n_images: int, captions_per_image: int = 5, dataset: str = "coco",
                   size: int = 24) -> tuple[Path, Path]:
    """``root/dataset_<dataset>.json`` + images; returns (json, image root for --images).

    coco: images under ``<root>/images/<filepath>/`` with ``cocoid``, image i in split
    SPLIT_CYCLE[i % 5], caption j of image i is caption(i, j). flickr30k (as
    ``dataset_flickr30k.json`` lays it out): flat ``<filename>``, no filepath / cocoid, splits
    FLICKR_SPLIT_CYCLE (no restval), other images and captions (flickr_image, flickr_caption).
    """
    images_root = root / "images"
    entries = []
    flickr = dataset != "coco"
    cycle = FLICKR_SPLIT_CYCLE if flickr else SPLIT_CYCLE
    for i in range(n_images):
        split = cycle[i % len(cycle)]
        if dataset == "coco":
            folder = "val2014" if split != "train" else "train2014"
            name = f"COCO_{folder}_{100000 + i:012d}.jpg"
            entry = {"filepath": folder, "filename": name, "cocoid": 100000 + i}
        else:
            folder, name = "", f"{1000091 + i}.jpg"
            entry = {"filename": name}
        (images_root / folder).mkdir(parents=True, exist_ok=True)
        (images_root / folder / name).write_bytes(flickr_image(i, size) if flickr else image_bytes(i, size))
        text = flickr_caption if flickr else caption
        sentences = [{"tokens": text(i, j).split(), "raw": text(i, j).capitalize() + ".",
                      "imgid": i, "sentid": i * captions_per_image + j} for j in range(captions_per_image)]
        entries.append({**entry, "imgid": i, "split": split, "sentences": sentences,
                        "sentids": [s["sentid"] for s in sentences]})
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return path, images_root


def write_coco_captions(root: Path, n_images: int, captions_per_image: int = 5) -> Path:
    """COCO captions_val.json (ids 1..n) + root/val images; returns the JSON path."""
    ids = [1 + 7 * i for i in range(n_images)]
    return write_coco(root, {k: image_bytes(k) for k in ids},
                      {k: [caption(i, j) for j in range(captions_per_image)] for i, k in enumerate(ids)})


def imagenet_wnids(n_classes: int) -> list[str]:
    """wnid-shaped ids in sorted order (n0144xxxx ...), one per class."""
    return [f"n{1440764 + 1000 * k:08d}" for k in range(n_classes)]


def write_imagenet_folders(root: Path, n_classes: int, per_class: int, size: int = 24,
                           split: str = "train") -> tuple[Path, Path]:
    """ImageNet layout ``root/<split>/<wnid>/<wnid>_<i>.JPEG`` + ``root/LOC_synset_mapping.txt``
    (``n01440764 tench, Tinca tinca`` style: wnid, names from clip_benchmark's ImageNet list).
    Returns (class-folder tree, mapping file)."""
    names = imagenet_names()
    tree = root / split
    for label, wnid in enumerate(imagenet_wnids(n_classes)):
        (tree / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (tree / wnid / f"{wnid}_{i}.JPEG").write_bytes(class_image(label, i, size))
    mapping = root / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{w} {names[k]}, synonym {k}\n" for k, w in enumerate(imagenet_wnids(n_classes))))
    return tree, mapping


def _cifar_batch(labels: list[int], key: bytes, offset: int, label_name: str) -> dict:
    data = np.stack([np.asarray(Image.open(io.BytesIO(class_image(l, offset + i, 32, "PNG"))))
                     .transpose(2, 0, 1).reshape(-1) for i, l in enumerate(labels)])  # (N, 3072)
    return {b"batch_label": label_name.encode(), key: labels, b"data": data.astype(np.uint8),
            b"filenames": [f"image_{offset + i:05d}.png".encode() for i in range(len(labels))]}


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the originals are python-2 pickles with bytes keys


def write_cifar10(root: Path, per_batch: int = 10, test: int = 10) -> Path:
    """``root/cifar-10-batches-py`` as the real archive extracts: data_batch_1..5, test_batch,
    batches.meta. Label of image i in a batch: i % 10. Returns the folder."""
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(i + b) % 10 for i in range(per_batch)]
        _dump(out / f"data_batch_{b}", _cifar_batch(labels, b"labels", b * 1000, f"training batch {b} of 5"))
    _dump(out / "test_batch", _cifar_batch([i % 10 for i in range(test)], b"labels", 0, "testing batch 1 of 1"))
    _dump(out / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                 b"num_vis": 3072})
    return out


def write_cifar100(root: Path, train: int = 20, test: int = 10) -> Path:
    """``root/cifar-100-python``: train, test (fine_labels, coarse_labels), meta (fine/coarse names).
    Fine names: the first 100 of clip_benchmark's ImageNet names stand in. Returns the folder."""
    out = root / "cifar-100-python"
    out.mkdir(parents=True)
    fine = [n.replace(" ", "_") for n in imagenet_names()[:100]]
    for split, n in (("train", train), ("test", test)):
        labels = [(7 * i) % 100 for i in range(n)]
        batch = _cifar_batch(labels, b"fine_labels", 0 if split == "test" else 5000, split)
        batch[b"coarse_labels"] = [l // 5 for l in labels]
        _dump(out / split, batch)
    _dump(out / "meta", {b"fine_label_names": [f.encode() for f in fine],
                         b"coarse_label_names": [f"superclass_{k}".encode() for k in range(20)]})
    return out


def write_text_corpus(path: Path, n_lines: int) -> Path:
    """A plain-text corpus, one natural sentence per line (BookCorpus-style)."""
    lines = [f"{caption(i).capitalize()} and then went home ." for i in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_img2dataset(root: Path, n: int, failed: tuple[int, ...] = (), shard: int = 0,
                      labels: bool = False) -> Path:
    """One img2dataset output shard: ``<shard>.tar`` (webdataset TarWriter: .jpg, .txt, .json;
    .cls when labels) + ``<shard>.parquet`` (pyarrow; every URL tried, failed ones with status
    and error_message) + ``<shard>_stats.json``. Rows in ``failed`` have no tar sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    stem = f"{shard:05d}"
    rows, samples = [], []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        ok = i not in failed
        rows.append({"url": f"http://images.example.invalid/{key}.jpg", "caption": caption(shard * 1000 + i),
                     "key": key, "status": "success" if ok else "failed_to_download",
                     "error_message": None if ok else "HTTP Error 404: Not Found",
                     "width": 24 if ok else None, "height": 24 if ok else None,
                     "original_width": 48 if ok else None, "original_height": 48 if ok else None,
                     "exif": None, "sha256": None})
        if ok:
            meta = {k: v for k, v in rows[-1].items()}
            sample = {"__key__": key, "jpg": image_bytes(shard * 1000 + i), "txt": rows[-1]["caption"],
                      "json": meta}
            if labels:
                sample["cls"] = i % 3
            samples.append(sample)
    write_webdataset(root / f"{stem}.tar", samples)
    pq.write_table(pa.Table.from_pylist(rows), root / f"{stem}.parquet")
    (root / f"{stem}_stats.json").write_text(json.dumps(
        {"count": n, "successes": n - len(failed), "failed_to_download": len(failed)}))
    return root


def write_word_tokenizer(path: Path, texts: list[str] | None = None) -> Path:
    """A word-level tokenizer.json (tokenizers library) covering ``texts`` (default: every word
    the writers here produce). Specials: <|endoftext|> (EOS/PAD), <|image|>, <unk>, <mask>."""
    from dodo.data.tokenizer import SPECIAL_TOKENS, word_level_tokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    word_level_tokenizer([*all_words(), *(texts or [])], [*SPECIAL_TOKENS, "<mask>"]).save(str(path))
    return path


def make_cache(src: Path | str, source: str, out: Path, **options) -> Path:
    """``dodo data cache SRC --from SOURCE --out OUT`` in process (quiet); returns OUT.
    Options are CacheOptions fields (image_size=32, encode="jpeg", split=..., classnames=...)."""
    from dodo.data.cache import CacheOptions, build_cache

    opts = dict(image_size=32, encode="jpeg", samples_per_shard=64, workers=1)
    opts.update(options)
    build_cache(CacheOptions(source=source, src=str(src), out=str(out), **opts), log=lambda m: None)
    return out


def real_caches(root: Path, image_size: int = 32, n_images: int = 40, store: str = "hdf5") -> dict[str, Path]:
    """A small set of real-format caches for end-to-end runs, written and cached under root:

    coco_train (Karpathy train+restval, 5 captions per image), coco_test (Karpathy test),
    flickr_test, imagenet_train / imagenet_val (4 classes, wnid folders + LOC_synset_mapping),
    cifar10_train / cifar10_test, webdataset (img2dataset tar + parquet), text (16-token blocks),
    and tokenizer (a word-level tokenizer.json covering all of it)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    tok = out["tokenizer"] = write_word_tokenizer(root / "tokenizer" / "tokenizer.json")
    kw = dict(image_size=image_size, store=store)
    js, imgs = write_karpathy(root / "src" / "coco", n_images, 5, "coco", size=image_size)
    out["coco_train"] = make_cache(js, "karpathy", root / "coco_train", images=str(imgs), split="train,restval", **kw)
    out["coco_test"] = make_cache(js, "karpathy", root / "coco_test", images=str(imgs), split="test", **kw)
    js, imgs = write_karpathy(root / "src" / "flickr", n_images, 5, "flickr30k", size=image_size)
    out["flickr_test"] = make_cache(js, "karpathy", root / "flickr_test", images=str(imgs), split="test", **kw)
    per = max(2, n_images // 4)
    tree, mapping = write_imagenet_folders(root / "src" / "imagenet", 4, per, size=image_size)
    out["imagenet_train"] = make_cache(tree, "folder", root / "imagenet_train", classnames=str(mapping),
                                       dataset="imagenet1k", split="train", **kw)
    vtree, _ = write_imagenet_folders(root / "src" / "imagenet", 4, max(2, per // 2), size=image_size, split="val")
    out["imagenet_val"] = make_cache(vtree, "folder", root / "imagenet_val", classnames=str(mapping),
                                     dataset="imagenet1k", split="val", **kw)
    cifar = write_cifar10(root / "src", per_batch=max(2, n_images // 5), test=max(10, n_images // 4))
    out["cifar10_train"] = make_cache(cifar, "cifar", root / "cifar10_train", split="train", **kw)
    out["cifar10_test"] = make_cache(cifar, "cifar", root / "cifar10_test", split="test", **kw)
    i2d = write_img2dataset(root / "src" / "i2d", n_images, failed=(1,))
    out["webdataset"] = make_cache(i2d, "webdataset", root / "webdataset", **kw)
    corpus = write_text_corpus(root / "src" / "books.txt", 4 * n_images)
    out["text"] = make_cache(corpus, "text", root / "text", block=16, tokenizer=str(tok), store=store)
    return out


# --- which modules a run imports: a test-only hook in every process of a `dodo submit` --------
#
# A run on real data must never load the synthetic shapes generator. The hook is a
# sitecustomize.py put first on PYTHONPATH (the local backend keeps it after the run's code
# snapshot): Python imports it at start-up in the submitting process and in every rank, where it
# installs a meta-path finder that logs each process (pid, argv) and every import of a watched
# module with the stack that asked for it. It never changes what gets imported.

SHAPES_MODULES = ("dodo.data.synthetic", "dodo.eval.shapes", "dodo.tasks.shapes")

_HOOK = '''import os, sys, traceback
_LOG = os.environ["DODO_TEST_IMPORT_LOG"]
_WATCH = set(os.environ["DODO_TEST_IMPORT_WATCH"].split(","))
with open(_LOG, "a") as _f:
    _f.write("process %d %s\\n" % (os.getpid(), " ".join(sys.argv)))
class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name in _WATCH:
            with open(_LOG, "a") as f:
                f.write("import %d %s\\n%s\\n" % (os.getpid(), name, "".join(traceback.format_stack(limit=14)[:-1])))
        return None
sys.meta_path.insert(0, _Watch())
'''


def import_watch(folder: Path, modules: tuple[str, ...] = SHAPES_MODULES) -> tuple[dict[str, str], Path]:
    """(env for ``dodo(..., env=)``, log file): every process of the run logs itself and any
    import of ``modules`` to the log (see :func:`watched_imports`)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HOOK)
    log = folder / "imports.log"
    path = os.pathsep.join([str(folder)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {"PYTHONPATH": path, "DODO_TEST_IMPORT_LOG": str(log),
            "DODO_TEST_IMPORT_WATCH": ",".join(modules)}, log


def watched_imports(log: Path) -> tuple[int, list[str], str]:
    """(number of processes that ran the hook, the "import PID MODULE" lines, the whole log
    with the importing stacks, for the assertion message)."""
    text = log.read_text() if log.exists() else ""
    lines = text.splitlines()
    return (sum(1 for l in lines if l.startswith("process ")), [l for l in lines if l.startswith("import ")], text)
