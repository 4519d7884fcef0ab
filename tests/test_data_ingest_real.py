"""Real dataset formats -> cache -> CachedDataset: image ids, labels, class names, captions, splits.

Inputs are written with the formats' own tools (tests/data_helpers.py): Karpathy / COCO JSON,
ImageNet class folders of PIL JPEGs with a LOC_synset_mapping.txt, CIFAR pickles with bytes
keys, img2dataset tars (webdataset TarWriter) + parquet (pyarrow), a text corpus and a
word-level tokenizer.json built with the tokenizers library. Captions are natural sentences,
five per image where the format has them.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data_helpers as dh
from conftest import REPO, dodo
from dodo.data.cache import CacheOptions, build_cache
from dodo.data.dataset import CachedDataset
from dodo.data.ingest import SourceError
from dodo.data.manifest import Manifest, describe


def cache(src, source: str, out: Path, **kw) -> Manifest:
    opts = dict(image_size=16, encode="jpeg", samples_per_shard=4, workers=1)
    opts.update(kw)
    return build_cache(CacheOptions(source=source, src=str(src), out=str(out), **opts), log=lambda m: None)


def samples(out: Path) -> list:
    ds = CachedDataset(out)
    return [ds[i] for i in range(len(ds))]


# --- captions with image ids ------------------------------------------------------------------

@pytest.mark.parametrize("store", ["hdf5", "zarr"])
def test_karpathy_coco_train_restval_five_captions_share_image_ids(tmp_path: Path, store: str) -> None:
    js, images = dh.write_karpathy(tmp_path / "k", 10, 5, "coco")
    m = cache(js, "karpathy", tmp_path / "out", images=str(images), split="train,restval", store=store)
    wanted = [i for i in range(10) if dh.SPLIT_CYCLE[i % 5] in ("train", "restval")]  # 6 images
    assert (m.dataset, m.split, m.modality, m.has_labels) == ("coco", "train,restval", "image_text", False)
    assert (m.num_images, m.num_captions, m.captions_per_image) == (6, 30, 5.0)
    got = samples(tmp_path / "out")
    assert [s.image_id for s in got] == [k for k in range(6) for _ in range(5)]  # shards of 4 images
    for s in got:
        i, j = wanted[s.image_id], int(s.key.split("#")[1])
        assert s.key.startswith(f"{100000 + i:012d}#") and s.caption == dh.caption(i, j).capitalize() + "."
        assert s.label == -1 and s.image.shape == (16, 16, 3)
    ds = CachedDataset(tmp_path / "out")
    assert ds.image_ids().tolist() == [s.image_id for s in got]
    assert m.feeds()["multi_caption"] and not m.feeds()["labels"]


def test_held_out_split_never_cuts_an_image(tmp_path: Path) -> None:
    from dodo.data import build_datasets
    from dodo.data.config import DataConfig

    ann = dh.write_coco_captions(tmp_path / "coco", 4, 5)
    cache(ann, "coco", tmp_path / "out", samples_per_shard=3)
    cfg = DataConfig(kind="hdf5", train_cache=str(tmp_path / "out"), image_size=16, num_eval=7)
    train, held = build_datasets(cfg)
    assert (len(train), len(held)) == (10, 10)  # 7 captions reach into image 2: all 5 of it go
    assert set(train.image_ids()) == {0, 1} and set(held.image_ids()) == {2, 3}


def test_karpathy_flickr30k_test_split_and_bad_split(tmp_path: Path) -> None:
    js, images = dh.write_karpathy(tmp_path / "k", 10, 5, "flickr30k")
    m = cache(js, "karpathy", tmp_path / "out", images=str(images), split="test", store="zarr")
    assert (m.dataset, m.split, m.num_images, m.num_captions) == ("flickr30k", "test", 2, 10)
    got = samples(tmp_path / "out")
    assert [s.key.split("#")[0] for s in got[::5]] == ["000000000004", "000000000009"]  # imgid
    assert {s.image_id for s in got[5:]} == {1}
    with pytest.raises(SourceError, match="not a Karpathy split"):
        cache(js, "karpathy", tmp_path / "bad", images=str(images), split="training")
    assert not (tmp_path / "bad").exists()


def test_coco_captions_json_records_image_ids(tmp_path: Path) -> None:
    ann = dh.write_coco_captions(tmp_path / "coco", 3, 5)
    m = cache(ann, "coco", tmp_path / "out", samples_per_shard=2)
    assert (m.dataset, m.split, m.num_images, m.captions_per_image) == ("coco", "val", 3, 5.0)
    got = samples(tmp_path / "out")
    assert [s.image_id for s in got] == [0] * 5 + [1] * 5 + [2] * 5  # image 2 is in shard 1
    assert got[7].caption == dh.caption(1, 2)


# --- labelled images --------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["hdf5", "zarr"])
def test_imagenet_folders_with_synset_mapping(tmp_path: Path, store: str) -> None:
    tree, mapping = dh.write_imagenet_folders(tmp_path / "imagenet", 4, 3)
    m = cache(tree, "folder", tmp_path / "out", classnames=str(mapping), store=store, dataset="imagenet1k")
    names = dh.imagenet_names()[:4]
    assert (m.modality, m.has_labels, m.classnames, m.class_ids) == ("image", True, names, dh.imagenet_wnids(4))
    assert (m.num_images, m.num_captions, m.dataset, m.captions_per_image) == (12, 12, "imagenet1k", 0.0)
    got = samples(tmp_path / "out")
    assert [s.label for s in got] == [k for k in range(4) for _ in range(3)]
    assert [s.image_id for s in got] == list(range(12)) and {s.caption for s in got} == {""}
    assert got[4].key == f"{dh.imagenet_wnids(4)[1]}/{dh.imagenet_wnids(4)[1]}_1"
    assert CachedDataset(tmp_path / "out").labels().tolist() == [s.label for s in got]
    f = m.feeds()
    assert f["labels"] and f["classnames"] and f["num_classes"] == 4 and not f["captions"]


def test_bad_image_in_a_class_folder_is_skipped_and_labels_stay_aligned(tmp_path: Path) -> None:
    tree, mapping = dh.write_imagenet_folders(tmp_path / "imagenet", 3, 2)
    wnid = dh.imagenet_wnids(3)[1]
    (tree / wnid / f"{wnid}_0.JPEG").write_bytes(dh.CORRUPT)
    m = cache(tree, "folder", tmp_path / "out", classnames=str(mapping), samples_per_shard=2)
    assert m.num_images == 5 and m.bad == {"corrupt image": 1}
    assert [(s.key.split("/")[0], s.label, s.image_id) for s in samples(tmp_path / "out")] == [
        (dh.imagenet_wnids(3)[k], k, i) for i, k in enumerate((0, 0, 1, 2, 2))]


def test_shift_set_subset_named_from_the_full_mapping(tmp_path: Path) -> None:
    """ImageNet-R / -A keep 200 of the 1000 wnids: names come from the full mapping by wnid."""
    tree, mapping = dh.write_imagenet_folders(tmp_path / "inet", 5, 1)
    for w in dh.imagenet_wnids(5)[1::2]:  # keep classes 0, 2, 4
        for f in (tree / w).iterdir():
            f.unlink()
        (tree / w).rmdir()
    m = cache(tree, "folder", tmp_path / "out", classnames=str(mapping))
    assert m.class_ids == dh.imagenet_wnids(5)[0::2]
    assert m.classnames == [dh.imagenet_names()[k] for k in (0, 2, 4)]
    (tmp_path / "list.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(SourceError, match="2 names for 3 classes"):
        cache(tree, "folder", tmp_path / "bad", classnames=str(tmp_path / "list.txt"))


def test_numeric_class_folders_sort_numerically_and_plain_names_file(tmp_path: Path) -> None:
    for label in (0, 1, 2, 10):  # ImageNetV2: folders are label indices
        (tmp_path / "v2" / str(label)).mkdir(parents=True)
        (tmp_path / "v2" / str(label) / "a.jpeg").write_bytes(dh.class_image(label, 0))
    (tmp_path / "names.txt").write_text("tench\ngoldfish\ngreat white shark\nrobin\n")
    m = cache(tmp_path / "v2", "folder", tmp_path / "out", classnames=str(tmp_path / "names.txt"))
    assert m.class_ids == ["0", "1", "2", "10"] and m.classnames[3] == "robin"


def test_imagenet_val_solution_csv(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    wnids = dh.imagenet_wnids(3)
    rows = []
    for i in range(6):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (tmp_path / "val" / f"{name}.JPEG").write_bytes(dh.class_image(i % 3, i))
        rows.append(f"{name},{wnids[i % 3]} 10 20 30 40 {wnids[i % 3]} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    m = cache(tmp_path / "LOC_val_solution.csv", "folder", tmp_path / "out", images=str(tmp_path / "val"))
    assert m.modality == "image" and m.class_ids == wnids
    assert [s.label for s in samples(tmp_path / "out")] == [i % 3 for i in range(6)]


def test_captions_jsonl_with_label_column(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(dh.image_bytes(i))
        for j in range(2):
            rows.append({"file": f"img/{i}.jpg", "caption": dh.caption(i, j), "label": ["dog", "cat"][i % 2]})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = cache(tmp_path / "c.jsonl", "folder", tmp_path / "out")
    assert (m.modality, m.classnames, m.captions_per_image) == ("image_text", ["cat", "dog"], 2.0)
    got = samples(tmp_path / "out")
    assert [(s.image_id, s.label) for s in got] == [(i, 1 - i % 2) for i in range(4) for _ in range(2)]


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path: Path, variant: str) -> None:
    folder = dh.write_cifar10(tmp_path, per_batch=4, test=6) if variant == "cifar10" else \
        dh.write_cifar100(tmp_path, train=8, test=6)
    m = cache(folder, "cifar", tmp_path / "train", split="train", encode="raw", image_size=32,
              workers=2 if variant == "cifar10" else 1)  # one forked build, to cover workers
    key = b"labels" if variant == "cifar10" else b"fine_labels"
    first = "data_batch_1" if variant == "cifar10" else "train"
    with open(folder / first, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert (m.dataset, m.split, m.modality, m.num_images) == (variant, "train", "image", 20 if variant == "cifar10" else 8)
    assert len(m.classnames) == (10 if variant == "cifar10" else 100) and m.class_ids[:2] == ["0", "1"]
    if variant == "cifar10":
        assert m.classnames == list(dh.CIFAR10_NAMES)
    else:
        assert m.classnames[0] == dh.imagenet_names()[0]
    got = samples(tmp_path / "train")
    assert [s.label for s in got[:len(batch[key])]] == list(batch[key])
    want = batch[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0)  # raw: stored exactly
    assert np.array_equal(got[1].image, want) and got[1].caption == ""
    t = cache(folder, "cifar", tmp_path / "test", split="test", store="zarr", image_size=32)
    assert (t.split, t.num_images) == ("test", 6)


# --- img2dataset, text ------------------------------------------------------------------------

def test_img2dataset_tar_and_parquet(tmp_path: Path) -> None:
    src = tmp_path / "i2d"
    dh.write_img2dataset(src, 6, failed=(2,), shard=0, labels=True)
    dh.write_img2dataset(src, 4, failed=(0, 3), shard=1, labels=True)
    m = cache(src, "webdataset", tmp_path / "out", classnames="")
    assert (m.num_images, m.bad) == (7, {"missing file": 3})
    assert m.has_labels and m.class_ids == ["0", "1", "2"]
    bad = [json.loads(l) for l in (tmp_path / "out" / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(b["key"] for b in bad) == ["000000002", "000010000", "000010003"]
    assert "404" in bad[0]["detail"]
    got = samples(tmp_path / "out")
    assert got[0].caption == dh.caption(0) and [s.label for s in got[:3]] == [0, 1, 0]


def test_text_corpus_lines_and_token_blocks(tmp_path: Path) -> None:
    corpus = dh.write_text_corpus(tmp_path / "books.txt", 12)
    tok = dh.write_word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    m = cache(corpus, "text", tmp_path / "lines")
    assert (m.modality, m.num_images, m.num_captions) == ("text", 0, 12)
    got = samples(tmp_path / "lines")
    assert got[3].image is None and got[3].caption == f"{dh.caption(3).capitalize()} and then went home ."
    assert got[3].image_id == -1 and got[3].label == -1
    b = cache(corpus, "text", tmp_path / "blocks", block=16, tokenizer=str(tok), store="zarr")
    assert b.tokenizer["name_or_path"] == str(tok) and len(b.tokenizer["sha256"]) == 64
    blocks = samples(tmp_path / "blocks")
    from dodo.data.tokenizer import load_tokenizer
    t = load_tokenizer(str(tok))
    stream = sum(t([l for l in corpus.read_text().splitlines()], add_special_tokens=False)["input_ids"], [])
    assert len(blocks) == len(stream) // 16
    for k, s in enumerate(blocks):
        assert s.tokens.dtype == np.int32 and s.tokens.tolist() == stream[16 * k:16 * (k + 1)]
        assert t(s.caption, add_special_tokens=False)["input_ids"] == s.tokens.tolist()
    assert "<unk>" not in " ".join(s.caption for s in blocks)  # the tokenizer covers the corpus


def test_text_jsonl_records_and_bad_text_options(tmp_path: Path) -> None:
    (tmp_path / "wiki.jsonl").write_text("".join(json.dumps({"text": dh.caption(i), "id": i}) + "\n"
                                                 for i in range(5)))
    m = cache(tmp_path / "wiki.jsonl", "text", tmp_path / "out")
    assert m.num_captions == 5 and samples(tmp_path / "out")[4].caption == dh.caption(4)
    with pytest.raises(SourceError, match="--block N cuts text into token blocks"):
        cache(tmp_path / "wiki.jsonl", "text", tmp_path / "bad", block=8)
    with pytest.raises(SourceError, match="--split train or test"):
        cache(dh.write_cifar10(tmp_path, 2, 2), "cifar", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# --- manifests: torch-free facts, old caches ------------------------------------------------

def test_describe_is_torch_free_and_real_data_never_imports_the_generator(tmp_path: Path) -> None:
    tree, mapping = dh.write_imagenet_folders(tmp_path / "imagenet", 2, 2)
    cache(tree, "folder", tmp_path / "out", classnames=str(mapping))
    code = f"""
import sys
from dodo.data.manifest import describe
f = describe({str(tmp_path / 'out')!r}).feeds()
assert f["labels"] and f["num_classes"] == 2, f
assert "torch" not in sys.modules, "describe imported torch"
from dodo.data.dataset import CachedDataset
ds = CachedDataset({str(tmp_path / 'out')!r}, with_attrs=True)
s = ds[3]
assert s.label == 1 and s.attrs == {{}}
assert "dodo.data.synthetic" not in sys.modules, "a real cache imported the shapes generator"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_old_manifest_and_shards_without_labels_still_load(tmp_path: Path) -> None:
    import h5py

    ann = dh.write_coco_captions(tmp_path / "coco", 2, 3)
    cache(ann, "coco", tmp_path / "out")
    path = tmp_path / "out" / "manifest.json"
    data = json.loads(path.read_text())
    new = ("modality", "num_images", "captions_per_image", "has_labels", "classnames", "class_ids",
           "dataset", "split", "tokenizer", "synthetic")
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in new}))
    for shard in (tmp_path / "out" / "shards").glob("*.h5"):
        with h5py.File(shard, "a") as f:
            del f["labels"]
    m = describe(tmp_path / "out")
    assert (m.modality, m.num_images, m.captions_per_image, m.has_labels) == ("image_text", 2, 3.0, False)
    ds = CachedDataset(tmp_path / "out", verify="none")
    assert [(s.image_id, s.label) for s in (ds[0], ds[5])] == [(0, -1), (1, -1)]


def test_cli_karpathy_and_one_line_error(tmp_path: Path) -> None:
    js, images = dh.write_karpathy(tmp_path / "k", 5, 5, "flickr30k")
    dodo("data", "cache", str(js), "--from", "karpathy", "--images", str(images), "--split", "val",
         "--out", str(tmp_path / "out"), "--image-size", "16", cwd=tmp_path)
    assert describe(tmp_path / "out").split == "val"
    bad = dodo("data", "cache", str(js), "--from", "karpathy", "--out", str(tmp_path / "bad"),
               cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("dodo: error:") and "--split" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_real_caches_helper_builds_every_format(tmp_path: Path) -> None:
    """The set other tests run end to end on: every cache opens and feeds what it says."""
    caches = dh.real_caches(tmp_path, image_size=16, n_images=10, store="zarr")
    feeds = {k: describe(v).feeds() for k, v in caches.items() if k != "tokenizer"}
    assert feeds["coco_test"]["multi_caption"] and feeds["coco_test"]["split"] == "test"
    assert feeds["imagenet_val"]["labels"] and feeds["imagenet_val"]["num_classes"] == 4
    assert feeds["cifar10_train"]["dataset"] == "cifar10" and not feeds["cifar10_train"]["captions"]
    assert feeds["text"]["tokens"] and not feeds["text"]["images"]
    assert not any(f["synthetic"] for f in feeds.values())
    s = CachedDataset(caches["imagenet_val"])[0]
    assert s.image.shape == (16, 16, 3) and s.caption == "" and s.label == 0


def test_svhn_mat_files(tmp_path: Path):
    """SVHN format 2 as distributed (MATLAB v5 written by scipy): X (32, 32, 3, N), y 1..10 with
    10 = the digit 0; a folder + --split or the file itself; a file without X is refused."""
    from scipy.io import savemat

    from dodo.data.dataset import CachedDataset
    from dodo.data.manifest import describe

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, 12), dtype=np.uint8)
    y = np.array([[1], [10], [3], [10], [5], [6], [7], [8], [9], [2], [4], [1]], dtype=np.uint8)
    root = tmp_path / "svhn"
    root.mkdir()
    savemat(str(root / "test_32x32.mat"), {"X": x, "y": y})
    out = dh.make_cache(root, "svhn", tmp_path / "svhn_test", split="test", encode="raw", image_size=32)
    m = describe(str(out))
    assert (m.dataset, m.split, m.modality, m.has_labels) == ("svhn", "test", "image", True)
    assert m.classnames[0] == "zero" and m.class_ids == [str(d) for d in range(10)]
    ds = CachedDataset(str(out), verify="none")
    assert list(ds.labels()) == [int(v) % 10 for v in y[:, 0]]
    assert np.array_equal(ds[1].image, x[:, :, :, 1]) and ds[1].label == 0
    savemat(str(tmp_path / "bad.mat"), {"images": x})
    with pytest.raises(Exception, match="no X / y"):
        dh.make_cache(tmp_path / "bad.mat", "svhn", tmp_path / "bad_cache")
    assert not (tmp_path / "bad_cache").exists()


def test_a_names_file_in_another_order_than_the_folders_is_refused(tmp_path: Path):
    """Folders eight/ five/ ... sort alphabetically; a names file listing the same folder names in
    digit order would give every class another's name: refused, with the fix."""
    from PIL import Image

    names = ["zero", "one", "two"]
    for i, name in enumerate(names):
        (tmp_path / "tree" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / "tree" / name / "a.png")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")  # not the sorted folder order
    with pytest.raises(Exception, match="another order than the labels"):
        dh.make_cache(tmp_path / "tree", "folder", tmp_path / "bad", classnames=str(tmp_path / "names.txt"))
    assert not (tmp_path / "bad").exists()
    (tmp_path / "sorted.txt").write_text("\n".join(sorted(names)) + "\n")
    out = dh.make_cache(tmp_path / "tree", "folder", tmp_path / "ok", classnames=str(tmp_path / "sorted.txt"))
    from dodo.data.manifest import describe
    assert describe(str(out)).classnames == sorted(names)
