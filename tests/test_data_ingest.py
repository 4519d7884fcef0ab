"""`dodo data cache`: every source format round-trips; bad samples are skipped and reported;
bad sources fail with one message; a killed build resumes. Inputs are written by the real
libraries (webdataset's TarWriter, a COCO JSON that pycocotools reads)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import dodo
from data_helpers import CORRUPT, image_bytes, truncated, write_coco, write_webdataset
from dodo.data.cache import CacheOptions, build_cache
from dodo.data.dataset import CachedDataset
from dodo.data.ingest import SourceError
from dodo.data.manifest import CacheError, Manifest
from dodo.data.store import ShardReader


def cache(src, source: str, out: Path, **kw) -> Manifest:
    opts = dict(image_size=0, encode="jpeg", samples_per_shard=3, workers=1)
    opts.update(kw)
    return build_cache(CacheOptions(source=source, src=str(src), out=str(out), **opts), log=lambda m: None)


def stored(out: Path) -> dict[str, tuple[bytes, list[str]]]:
    """{key: (stored image bytes, captions)} over every shard of a cache."""
    m = Manifest.load(out)
    found: dict[str, tuple[bytes, list[str]]] = {}
    for info in m.shards:
        r = ShardReader(m.shard_path(out, info), m.store)
        r.open()
        for row, key in enumerate(r.keys):
            caps = [c for c, owner in zip(r.captions, r.caption_image) if owner == row]
            found[key] = (np.asarray(r.encoded(row)).tobytes(), caps)
        r.close()
    return found


def report(out: Path) -> dict[str, str]:
    return {b["key"]: b["reason"] for b in map(json.loads, (out / "bad_samples.jsonl").read_text().splitlines())}


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("store", ["hdf5", "zarr"])
def test_webdataset_round_trip(tmp_path: Path, store: str) -> None:
    imgs = {f"s{i:03d}": image_bytes(i, fmt="PNG" if i == 3 else "JPEG") for i in range(7)}
    for part in range(2):  # two tars, as img2dataset writes them
        write_webdataset(tmp_path / f"{part:05d}.tar",
                         [{"__key__": k, ("png" if k == "s003" else "jpg"): v, "txt": f"caption of {k}",
                           "json": {"key": k}} for k, v in imgs.items() if int(k[1:]) % 2 == part])
    m = cache(tmp_path, "webdataset", tmp_path / "out", store=store)
    assert (m.num_samples, m.num_captions, len(m.shards), m.bad) == (7, 7, 3, {})
    got = stored(tmp_path / "out")
    assert sorted(got) == sorted(imgs)
    for k, (data, caps) in got.items():
        assert caps == [f"caption of {k}"]
        if k != "s003":
            assert data == imgs[k]  # JPEG kept byte for byte when no resize is asked
    assert m.source["kind"] == "webdataset" and m.options["store"] == store and m.dodo_version


def test_coco_round_trip_keeps_every_caption(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    images = {i: image_bytes(i) for i in (42, 7, 9)}
    caps = {i: [f"image {i} caption {j}" for j in range(5 if i != 9 else 1)] for i in images}
    ann = write_coco(tmp_path / "coco", images, caps)
    coco = COCO(str(ann))  # the real reader accepts the file
    assert len(coco.getAnnIds(imgIds=[42])) == 5
    m = cache(ann, "coco", tmp_path / "out")  # images found at annotations/../val
    assert (m.num_samples, m.num_captions) == (3, 11)
    got = stored(tmp_path / "out")
    for i, data in images.items():
        assert got[f"{i:012d}"] == (data, caps[i])
    ds = CachedDataset(tmp_path / "out")
    assert len(ds) == 11
    assert [ds[j].key for j in range(6)] == [f"000000000007#{j}" for j in range(5)] + ["000000000009"]
    assert ds[0].caption == "image 7 caption 0" and ds[0].image.shape == (24, 24, 3)


def test_cc3m_tsv_with_img2dataset_folders(tmp_path: Path) -> None:
    rows = [(f"a photo number {r}", f"http://example.invalid/{r}.jpg") for r in range(5)]
    (tmp_path / "cc3m.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    (tmp_path / "00000").mkdir()
    for r in (0, 1, 3, 4):  # row 2's download failed
        (tmp_path / "00000" / f"{r:09d}.jpg").write_bytes(image_bytes(r))
        (tmp_path / "00000" / f"{r:09d}.txt").write_text(rows[r][0])
    m = cache(tmp_path / "cc3m.tsv", "cc3m", tmp_path / "out", image_size=16)
    assert m.num_samples == 4 and m.bad == {"missing file": 1}
    assert report(tmp_path / "out") == {"000000002": "missing file"}
    ds = CachedDataset(tmp_path / "out")
    assert [ds[i].caption for i in range(4)] == [rows[r][0] for r in (0, 1, 3, 4)]
    assert ds[0].image.shape == (16, 16, 3)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_folder_round_trip(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "img").mkdir()
    rows = [(f"img/{i}.png", f"caption {i}") for i in range(4)] + [("img/0.png", "second caption 0")]
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
    path = tmp_path / f"captions.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"file{sep}caption\n" + "".join(f"{f}{sep}{c}\n" for f, c in rows))
    m = cache(path, "folder", tmp_path / "out", image_size=8, encode="raw")
    assert (m.num_samples, m.num_captions) == (4, 5)
    ds = CachedDataset(tmp_path / "out")
    assert [s.caption for s in (ds[0], ds[1])] == ["caption 0", "second caption 0"]
    assert ds[0].image.shape == (8, 8, 3) and ds[0].image.dtype == np.uint8


def test_synthetic_cache_equals_the_generator(tmp_path: Path) -> None:
    from dodo.data.synthetic import SyntheticShapes

    cache("eval", "synthetic", tmp_path / "out", num=10, image_size=32, encode="raw", seed=7)
    ref, ds = SyntheticShapes("eval", 10, 32, 7), CachedDataset(tmp_path / "out")
    for i in range(10):
        assert np.array_equal(ds[i].image, ref[i].image)
        assert (ds[i].caption, ds[i].key) == (ref[i].caption, ref[i].key)


def test_pretokenised_captions_are_stored(tmp_path: Path) -> None:
    from dodo.data.tokenizer import load_tokenizer

    cache("train", "synthetic", tmp_path / "out", num=4, image_size=16, tokenizer="builtin:synthetic")
    m = Manifest.load(tmp_path / "out")
    r = ShardReader(m.shard_path(tmp_path / "out", m.shards[0]), "hdf5")
    r.open()
    tok = load_tokenizer("builtin:synthetic")
    assert [list(t) for t in r.tokens] == tok(r.captions, add_special_tokens=False)["input_ids"]


# --- bad samples -------------------------------------------------------------------------------

def test_bad_webdataset_samples_are_skipped_and_reported(tmp_path: Path) -> None:
    good = image_bytes(1)
    write_webdataset(tmp_path / "a.tar", [
        {"__key__": "ok0", "jpg": good, "txt": "fine"},
        {"__key__": "corrupt", "jpg": CORRUPT, "txt": "x"},
        {"__key__": "trunc", "jpg": truncated(image_bytes(2, size=64)), "txt": "x"},
        {"__key__": "empty", "jpg": good, "txt": "  \n"},
        {"__key__": "latin1", "jpg": good, "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "nocap", "jpg": good},
        {"__key__": "noimg", "txt": "caption without image"},
        {"__key__": "ok1", "jpg": good, "txt": "fine too"},
    ])
    m = cache(tmp_path / "a.tar", "webdataset", tmp_path / "out")
    assert m.num_samples == 2 and sorted(stored(tmp_path / "out")) == ["ok0", "ok1"]
    assert report(tmp_path / "out") == {
        "corrupt": "corrupt image", "trunc": "truncated image", "empty": "empty caption",
        "latin1": "non-utf8 caption", "nocap": "missing caption", "noimg": "missing file"}
    assert m.bad == {"corrupt image": 1, "empty caption": 1, "missing caption": 1, "missing file": 1,
                     "non-utf8 caption": 1, "truncated image": 1}


def test_damaged_and_truncated_tar_members(tmp_path: Path) -> None:
    import tarfile

    samples = [{"__key__": f"k{i}", "jpg": image_bytes(i), "txt": f"c{i}"} for i in range(4)]
    write_webdataset(tmp_path / "a.tar", samples)
    with tarfile.open(tmp_path / "a.tar") as tf:
        members = {m.name: m for m in tf}
    data = bytearray((tmp_path / "a.tar").read_bytes())
    lo, hi = members["k1.jpg"].offset, members["k1.jpg"].offset_data
    data[lo:hi] = b"\x07" * (hi - lo)  # k1.jpg's headers are garbage
    end = members["k3.txt"].offset_data  # cut the file inside the last member's data
    (tmp_path / "a.tar").write_bytes(bytes(data[:end + 1]))
    m = cache(tmp_path / "a.tar", "webdataset", tmp_path / "out")
    assert sorted(stored(tmp_path / "out")) == ["k0", "k2"]
    reasons = report(tmp_path / "out")
    assert reasons["k3"] == "unreadable tar member" and reasons["k1"] == "missing file"
    assert m.bad["unreadable tar member"] == 2  # the damaged header and the truncated member


def test_bad_coco_and_folder_samples(tmp_path: Path) -> None:
    images = {1: image_bytes(1), 2: None, 3: CORRUPT, 4: image_bytes(4), 5: image_bytes(5)}
    caps = {1: ["good"], 2: ["file missing"], 3: ["corrupt"], 4: [""], 5: []}
    ann = write_coco(tmp_path / "coco", images, caps)
    m = cache(ann, "coco", tmp_path / "out", image_size=16)
    assert m.num_samples == 1
    assert report(tmp_path / "out") == {"000000000002": "missing file", "000000000003": "corrupt image",
                                        "000000000004": "empty caption", "000000000005": "missing caption"}
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(image_bytes(1, fmt="PNG"))
    (tmp_path / "f" / "caps.csv").write_bytes(b"file,caption\na.png,ok\na.png,caf\xe9\nb.png,gone\n")
    m = cache(tmp_path / "f" / "caps.csv", "folder", tmp_path / "out2", image_size=8)
    assert (m.num_samples, m.num_captions) == (1, 1)  # a.png keeps its good caption
    assert report(tmp_path / "out2") == {"a#1": "non-utf8 caption", "b": "missing file"}


def test_every_sample_bad_is_a_clear_error(tmp_path: Path) -> None:
    write_webdataset(tmp_path / "a.tar", [{"__key__": "x", "jpg": CORRUPT, "txt": "c"}])
    with pytest.raises(CacheError, match="every sample .* was bad .*1 corrupt image"):
        cache(tmp_path / "a.tar", "webdataset", tmp_path / "out")


# --- bad sources, via the real command ------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["/no/such.json", "--from", "coco"], "COCO captions file /no/such.json does not exist"),
    (["/no/tars/*.tar", "--from", "webdataset"], "no webdataset tars at /no/tars"),
    (["BAD", "--from", "coco"], "is not a COCO captions JSON"),
    (["BAD", "--from", "folder"], "must end in .csv, .tsv or .jsonl"),
    (["test", "--from", "synthetic", "--num", "5"], "split name 'train' or 'eval'"),
    (["train", "--from", "synthetic", "--num", "5", "--encode", "raw", "--image-size", "0"], "--encode raw"),
])
def test_bad_source_is_one_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    args = [str(tmp_path / "bad.json") if a == "BAD" else a for a in args]
    proc = dodo("data", "cache", *args, "--out", str(tmp_path / "out"), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dodo: error:") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_rerun_with_other_options_is_refused(tmp_path: Path) -> None:
    cache("train", "synthetic", tmp_path / "out", num=6, image_size=16)
    assert Manifest.load(tmp_path / "out").num_samples == 6
    cache("train", "synthetic", tmp_path / "out", num=6, image_size=16, workers=2)  # complete: no-op
    with pytest.raises(CacheError, match="other options .*image_size: 16 then, 24 now"):
        cache("train", "synthetic", tmp_path / "out", num=6, image_size=24)
    with pytest.raises(SourceError, match="--samples-per-shard"):
        cache("train", "synthetic", tmp_path / "x", num=6, samples_per_shard=0)


# --- resume after a kill -----------------------------------------------------------------------

# Test-only fault injection: SIGKILL the build as it publishes shard 2 (after shards 0 and 1),
# with a half-written shard 2 left behind, the way a node failure would leave it.
KILL_AT_SHARD_2 = textwrap.dedent("""
    import os, signal
    _replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("shard-00002.h5"):
            os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *a, **k)
    os.replace = replace
""")


def test_killed_cache_build_resumes(tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILL_AT_SHARD_2)
    args = ["data", "cache", "train", "--from", "synthetic", "--num", "50", "--image-size", "16",
            "--samples-per-shard", "10", "--workers", "1"]
    killed = dodo(*args, "--out", str(tmp_path / "out"), cwd=tmp_path, env={"PYTHONPATH": str(inject)},
                  check=False)
    assert killed.returncode == -9, killed.stderr
    shards = tmp_path / "out" / "shards"
    assert sorted(p.name for p in shards.glob("*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    assert (shards / "shard-00002.h5.tmp").exists() and not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(CacheError, match="incomplete .*rerun the same"):
        CachedDataset(tmp_path / "out")
    # Damage a finished shard too: its checksum no longer matches, so it is rebuilt.
    with open(shards / "shard-00001.h5", "r+b") as f:
        f.seek(4000)
        f.write(b"\xff\xff\xff\xff")
    resumed = dodo(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "1 finished shards kept" in resumed.stderr, resumed.stderr
    straight = dodo(*args, "--out", str(tmp_path / "straight"), cwd=tmp_path)
    assert "complete: 50 samples" in straight.stderr
    a, b = Manifest.load(tmp_path / "out"), Manifest.load(tmp_path / "straight")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # byte-identical shards
    assert not list(shards.glob("*.tmp"))
