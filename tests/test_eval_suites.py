"""eval.suites: the submit-time check reads real caches' manifests (Karpathy COCO with 5
captions per image, CIFAR-10 pickles, ImageNet-style class folders, the synthetic generator),
and the runner returns per-dataset keys with the OOD mean."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import data_helpers as dh  # noqa: E402

from dodo.config.errors import ConfigError  # noqa: E402
from dodo.config.loader import load_job  # noqa: E402
from dodo.eval import classnames as cn  # noqa: E402
from dodo.eval.config import EvalDataset, EvalSuite  # noqa: E402
from dodo.eval.runner import SuiteHooks, ood_means, run_suites  # noqa: E402
from dodo.eval.suites import check_suites, effective_suites  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    from dodo.data.cache import CacheOptions, build_cache

    root = tmp_path_factory.mktemp("eval_caches")
    quiet = dict(log=lambda m: None)
    js, imgs = dh.write_karpathy(root / "k", 10)
    build_cache(CacheOptions(source="karpathy", src=str(js), out=str(root / "coco"), images=str(imgs),
                             image_size=16, split="test,val"), **quiet)
    c = dh.write_cifar10(root / "c")
    for split in ("train", "test"):
        build_cache(CacheOptions(source="cifar", src=str(c), out=str(root / f"cifar_{split}"), image_size=16,
                                 split=split), **quiet)
    tree, mapping = dh.write_imagenet_folders(root / "in", 3, 2)
    build_cache(CacheOptions(source="folder", src=str(tree), out=str(root / "folders"), image_size=16,
                             classnames=str(mapping)), **quiet)
    # An ImageNet-R-like tree: 3 of its 200 classes, folders named by their real wnids.
    order = cn.imagenet_wnids()
    r_tree = root / "r"
    for label, idx in enumerate(cn.subset_indices("imagenet_r")[:3]):
        (r_tree / order[idx]).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * label + i, np.uint8)).save(r_tree / order[idx] / f"{i}.jpg")
    build_cache(CacheOptions(source="folder", src=str(r_tree), out=str(root / "imagenet_r"), image_size=16), **quiet)
    build_cache(CacheOptions(source="synthetic", src="eval", out=str(root / "shapes"), num=40, image_size=16), **quiet)
    return {p.name: p for p in root.iterdir() if (p / "manifest.json").exists()}


def job(caches: dict[str, Path], suites: str, data: str = "coco") -> object:
    return load_job(REPO / "jobs/demo.yaml", ["data.kind=hdf5", f"data.train_cache={caches[data]}",
                                              "data.eval_cache=''", "data.synthetic_on_first_use=false",
                                              f"eval.suites={suites}"])


def test_suites_the_data_can_feed_pass(caches):
    c = caches
    check_suites(job(c, f"[{{kind: retrieval, datasets: [{{name: coco_5k, cache: {c['coco']}}}]}},"
                        f" {{kind: zeroshot, datasets: [{{name: cifar10, cache: {c['cifar_test']}}},"
                        f"  {{name: in_r, cache: {c['imagenet_r']}, classnames: 'clip_benchmark:imagenet1k',"
                        f"    class_subset: imagenet_r, tag: ood}}]}},"
                        f" {{kind: knn, datasets: [{{name: cifar10, cache: {c['cifar_test']}, train_cache: {c['cifar_train']}}}]}},"
                        f" {{kind: linear_probe, datasets: [{{name: c10, cache: {c['cifar_test']}, train_cache: {c['cifar_train']}}}]}},"
                        f" {{kind: captioning, datasets: [{{name: heldout}}]}}]"))
    check_suites(job(c, "[{kind: shapes}]", data="shapes"))


@pytest.mark.parametrize("suites, data, match", [
    ("[{kind: retrieval}, {kind: zeroshot, datasets: [{name: flickr_test, cache: COCO}]}]", "coco",
     r"^eval.suites\[1\] zeroshot on dataset 'flickr_test' \(.*coco\): the cache has no labels; "
     r"zero-shot classification needs a labelled cache \(dodo data cache SRC --from folder\|cifar"),
    ("[{kind: shapes}]", "coco", r"eval.suites\[0\] shapes on dataset 'heldout' \(data.train_cache=.*\): "
                                 r"the data is not the synthetic shapes data"),
    ("[{kind: retrieval, datasets: [{name: c10, cache: CIFAR_TEST}]}]", "coco", "the cache has no captions"),
    ("[{kind: knn, datasets: [{name: c10, cache: CIFAR_TEST, train_cache: COCO}]}]", "coco",
     "its training \\(bank\\) cache has no labels"),
    ("[{kind: zeroshot, datasets: [{name: r, cache: FOLDERS, classnames: 'clip_benchmark:imagenet1k'}]}]", "coco",
     "the cache has 3 classes but classnames 'clip_benchmark:imagenet1k' gives 1000"),
    ("[{kind: zeroshot, datasets: [{name: r, cache: FOLDERS, class_subset: imagenet_r}]}]", "coco",
     "are not ImageNet wnids"),
    ("[{kind: zeroshot, datasets: [{name: r, cache: FOLDERS, templates: /no/such.txt}]}]", "coco",
     "neither clip_benchmark:<dataset> nor a file"),
    ("[{kind: zeroshot, datasets: [{name: s, cache: SHAPES}]}]", "coco", "use kind: shapes"),
    ("[{kind: retrieval, datasets: [{name: gone, cache: /no/such/cache}]}]", "coco", "does not exist"),
])
def test_suites_the_data_cannot_feed_are_refused_in_one_line(caches, suites, data, match):
    for name in ("COCO", "CIFAR_TEST", "FOLDERS", "SHAPES"):
        suites = suites.replace(name, str(caches[name.lower()]))
    with pytest.raises(ConfigError, match=match) as err:
        check_suites(job(caches, suites, data))
    assert "\n" not in str(err.value)


def test_defaults_and_family_hooks(caches):
    shapes_job = job(caches, "[]", data="shapes")
    assert [s.kind for s in effective_suites(shapes_job, ("retrieval",))] == ["shapes"]
    assert [s.kind for s in effective_suites(load_job(REPO / "jobs/demo.yaml"))] == ["shapes"]
    real = job(caches, "[]")
    assert [s.kind for s in effective_suites(real, ("captioning",))] == ["captioning"]
    with pytest.raises(ConfigError, match="has no generate for captioning"):
        check_suites(job(caches, "[{kind: captioning}]"), hooks=("encode_images", "encode_texts"))


def test_ood_means():
    per = {"a": {"top1": 0.5, "top5": 0.9}, "b": {"top1": 0.2}, "c": {"top1": 0.4, "top5": 0.7}}
    assert ood_means(per, {"a": "id", "b": "ood", "c": "ood"}) == {"top1": pytest.approx(0.3), "top5": 0.7}


def test_run_suites_on_real_caches(caches):
    from dodo.data.dataset import CachedDataset
    from dodo.data.manifest import describe

    g = torch.Generator().manual_seed(0)
    proj = torch.randn(16 * 16 * 3, 8, generator=g)
    encode_images = lambda x: x.reshape(len(x), -1).float() @ proj  # noqa: E731  (B, H, W, 3) -> (B, 8)
    words: dict[str, torch.Tensor] = {}

    def encode_texts(texts: list[str]) -> torch.Tensor:  # bag of random word vectors
        return torch.stack([sum(words.setdefault(w, torch.randn(8, generator=g)) for w in t.split()) for t in texts])

    c = caches
    coco = CachedDataset(c["coco"], verify="none")
    refs: dict[int, str] = {}
    for i in range(len(coco)):
        refs.setdefault(coco[i].image_id, coco[i].caption)
    lookup = {coco[i].image.tobytes(): refs[coco[i].image_id] for i in range(len(coco))}
    hooks = SuiteHooks(open_cache=lambda p: CachedDataset(p, verify="none"), heldout=coco,
                       encode_images=encode_images, encode_texts=encode_texts, describe=describe,
                       generate=lambda images, **decoding: seen.append(decoding) or [lookup[im.tobytes()] for im in images])
    seen: list[dict] = []
    suites = [EvalSuite(kind="retrieval", datasets=[EvalDataset(name="coco", cache=str(c["coco"])),
                                                    EvalDataset(name="coco_again", tag="ood")]),
              EvalSuite(kind="zeroshot", datasets=[EvalDataset(name="cifar10", cache=str(c["cifar_test"])),
                                                   EvalDataset(name="in_r", cache=str(c["imagenet_r"]), tag="ood",
                                                               classnames="clip_benchmark:imagenet1k",
                                                               class_subset="imagenet_r")]),
              EvalSuite(kind="knn", k=3, datasets=[EvalDataset(name="cifar10", cache=str(c["cifar_test"]),
                                                               train_cache=str(c["cifar_train"]))]),
              EvalSuite(kind="captioning", decoding="beam", beams=2, datasets=[EvalDataset(name="coco")])]
    m = run_suites(suites, hooks)
    from dodo.eval.retrieval import run_retrieval
    assert m["eval.retrieval.coco.t2i_r1"] == run_retrieval(encode_images, encode_texts, coco)["t2i_r1"]
    assert m["eval.retrieval.ood_mean.r_mean"] == m["eval.retrieval.coco_again.r_mean"]
    assert {"eval.zeroshot.cifar10.top1", "eval.zeroshot.cifar10.top5", "eval.zeroshot.in_r.top1",
            "eval.zeroshot.ood_mean.top5", "eval.knn.cifar10.top1"} <= set(m)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k.startswith(("eval.zeroshot", "eval.knn")))
    # a generator that returns one of the references scores far above zero on BLEU-4 and CIDEr-D
    assert m["eval.captioning.coco.bleu4"] > 0.5 and m["eval.captioning.coco.cider"] > 1.0
    assert seen[0] == {"method": "beam", "beams": 2}  # the suite's decoding reaches the family's hook


def test_shapes_suite_id_and_ood():
    from dodo.data.synthetic import SyntheticShapes
    from dodo.eval import shapes

    heldout = SyntheticShapes("eval", 60, 16, seed=3)
    truth = {heldout[i].image.tobytes(): heldout[i].caption for i in range(len(heldout))}
    suite = EvalSuite(kind="shapes", num_ood=10)
    pool = shapes.ood_pool(10, shapes.DEFAULT_HOLDOUT, 16, 3)
    truth.update({pool[i].image.tobytes(): pool[i].caption for i in range(len(pool))})

    def generate(images):  # right caption for every second image, a wrong colour otherwise
        out = []
        for im in images:
            cap = truth[im.tobytes()]
            out.append(cap if len(out) % 2 == 0 else cap.replace(cap.split()[2], "orange"))
        return out
    hooks = SuiteHooks(open_cache=lambda p: None, heldout=heldout, generate=generate,
                       shapes_ood=lambda s: shapes.ood_pool(s.num_ood, shapes.DEFAULT_HOLDOUT, 16, 3))
    m = run_suites([suite], hooks)
    assert set(m) == {"eval.shapes.heldout.caption_accuracy", "eval.shapes.ood.caption_accuracy",
                      "eval.shapes.ood_mean.caption_accuracy"}
    assert 0.45 <= m["eval.shapes.heldout.caption_accuracy"] <= 0.55
    assert m["eval.shapes.ood.caption_accuracy"] == m["eval.shapes.ood_mean.caption_accuracy"] == 0.5


def test_real_data_never_imports_the_generator(caches, tmp_path):
    """Checking and running suites on real caches leaves dodo.data.synthetic unimported."""
    import subprocess

    code = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from dodo.config.loader import load_job
from dodo.eval.suites import check_suites
cfg = load_job({str(REPO / 'jobs/clip_lora.yaml')!r}, ["data.kind=hdf5", "data.train_cache={caches['coco']}",
               "data.eval_cache=''", "data.synthetic_on_first_use=false",
               "eval.suites=[{{kind: retrieval}}, {{kind: zeroshot, datasets: [{{name: c, cache: {caches['cifar_test']}}}]}}]"])
check_suites(cfg)
assert "dodo.data.synthetic" not in sys.modules and "dodo.data.ingest.synthetic" not in sys.modules, "imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_table_order_and_tags():
    from dodo.eval.results import column_label, dataset_tags, order_metric_keys

    suites = [EvalSuite(kind="zeroshot", datasets=[EvalDataset(name="imagenet"), EvalDataset(name="in_r", tag="ood"),
                                                   EvalDataset(name="in_a", tag="ood")])]
    tags = dataset_tags(suites)
    assert tags == {"zeroshot": {"imagenet": "id", "in_r": "ood", "in_a": "ood"}}
    keys = ["eval.zeroshot.ood_mean.top1", "eval.zeroshot.in_r.top1", "eval.loss", "eval.zeroshot.imagenet.top1",
            "eval.zeroshot.in_a.top1"]
    assert order_metric_keys(keys, tags) == ["eval.loss", "eval.zeroshot.imagenet.top1", "eval.zeroshot.in_a.top1",
                                             "eval.zeroshot.in_r.top1", "eval.zeroshot.ood_mean.top1"]
    assert column_label("eval.zeroshot.in_r.top1", tags) == "zeroshot in_r top1 (ood)"
    assert dataset_tags([EvalSuite(kind="shapes")]) == {"shapes": {"heldout": "id", "ood": "ood"}}


def test_shapes_holdout_words_checked_at_submit(caches):
    with pytest.raises(ConfigError, match=r"^eval.suites\[0\].ood_holdout\[0\]='pink square' must be 'colour shape'"):
        check_suites(job(caches, "[{kind: shapes, ood_holdout: [pink square]}]", data="shapes"))
    with pytest.raises(ConfigError, match=r"^eval.ood_holdout\[1\]='red cube' must be"):
        check_suites(load_job(REPO / "jobs/demo.yaml", ["eval.ood_holdout=[red square, red cube]"]))
    with pytest.raises(ConfigError, match="holds out every combination"):
        from dodo.eval.shapes import classes
        check_suites(load_job(REPO / "jobs/demo.yaml", [f"eval.ood_holdout=[{', '.join(classes())}]"]))
