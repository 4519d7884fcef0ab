"""Weak language supervision end to end: the tiny jobs train on 2 CPU ranks from real-format
caches (Karpathy COCO captions, ImageNet-style class folders, CIFAR-10 pickles; tests/data_helpers.py)
through `dodo submit`, improve their own held-out metric, and report kNN through eval.suites in
summary.json. The vision encoder is a random-weight tiny timm DINO ViT saved with safetensors,
as a DINO checkpoint is loaded. Bad input is refused at submit with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import dodo, run_dirs

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}  # configs/model/weak_tiny.yaml


def _dino_checkpoint(root: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from dodo.models.sources.libs import import_timm

    torch.manual_seed(3)
    net = import_timm().create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0, **VIT)
    path = root / "dino_tiny.safetensors"
    save_file(net.state_dict(), str(path))
    return path


def _common(c: dict[str, Path], train: str, test: str) -> list[str]:
    return [f"model.tokenizer={c['tokenizer']}", f"data.train_cache={c[train]}", f"data.eval_cache={c[test]}",
            "train.log_every=5", "cluster.max_restarts=0"]


def _knn(c: dict[str, Path]) -> str:
    return (f"eval.suites=[{{kind: knn, k: 5, datasets: [{{name: cifar10, cache: '{c['cifar10_test']}', "
            f"train_cache: '{c['cifar10_train']}'}}]}}]")


@pytest.mark.parametrize("job,train,override,expected", [
    ("weak_reprogram", "coco_train", "", "has no class labels"),
    ("weak_reprogram", "imagenet_train", "model.weak.reprogram.source_classes=clip_benchmark:nosuchset",
     "model.weak.reprogram.source_classes"),
    ("weak_mae_contrastive", "coco_train", "model.adapter.film.condition=task", "model.adapter.film.condition"),
    ("weak_mae_contrastive", "coco_train", "data.image_size=64", "data.image_size"),
    ("weak_mae_contrastive", "coco_train", "model.weak.suite_embedding=backbone eval.suites=[{kind: retrieval}]",
     "model.weak.suite_embedding"),
])
def test_bad_input_is_refused_at_submit(workdir: Path, real_data, job, train, override, expected):
    args = _common(real_data, train, "coco_test") + (override.split(" ", 1) if override else [])
    proc = dodo("submit", f"jobs/{job}.yaml", *args, cwd=workdir, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dodo: error:"), proc.stderr
    assert expected in lines[0], lines[0]
    assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mae_contrastive_job_on_karpathy_captions(workdir: Path, real_data):
    ckpt = _dino_checkpoint(workdir)
    dodo("submit", "jobs/weak_mae_contrastive.yaml", *_common(real_data, "coco_train", "coco_test"), _knn(real_data),
         "model.weak.vision.kind=timm", f"model.weak.vision.path={ckpt}",
         "model.weak.suite_embedding=backbone", cwd=workdir, timeout=600)  # kNN on the ViT's [CLS], as DINO
    (run,) = run_dirs(workdir / "runs", "weak_mae_contrastive")
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["initial"], summary["final"]
    assert last["eval.mae_mse"] < 0.7 * first["eval.mae_mse"], (first, last)  # reconstruction learns
    assert last["eval.loss"] < first["eval.loss"], (first, last)  # MAE + InfoNCE on held-out captions
    assert 0.0 <= last["eval.knn.cifar10.top1"] <= 1.0
    assert summary["trainable_parameters"] < summary["total_parameters"] / 2  # ViT and text encoder frozen


@pytest.mark.slow
@pytest.mark.multiprocess
def test_reprogram_job_on_class_folders(workdir: Path, real_data):
    dodo("submit", "jobs/weak_reprogram.yaml", *_common(real_data, "imagenet_train", "imagenet_val"), _knn(real_data),
         cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "weak_reprogram")
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["initial"], summary["final"]
    assert last["eval.reprogram_top1"] > first["eval.reprogram_top1"] + 0.2, (first, last)
    assert last["eval.loss"] < first["eval.loss"]
    assert "eval.knn.cifar10.top1" in last
    # only the program (3 x 32 x 32) and the learned label map (10 EuroSAT source names x 4 classes)
    assert summary["trainable_parameters"] == 3 * 32 * 32 + 10 * 4


# ---------------------------------------------------------------- cross-modal reprogramming

PLACES = ("in a river", "on a table", "at the market", "in the sea", "under a bridge", "in a bucket")


def _captioned_classes(root: Path, split: str, n: int, offset: int) -> Path:
    """A labelled captions file (CSV: file, caption, label; the folder source) whose captions
    name the class among other words: "a small photo of a goldfish in the sea"."""
    import csv

    from data_helpers import ADJECTIVES, class_image, imagenet_names

    names = imagenet_names()[:4]
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path = root / f"{split}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption", "label"])
        for i in range(offset, offset + n):
            label = i % 4
            (folder / f"{i}.jpg").write_bytes(class_image(label, i, 32))
            caption = f"a {ADJECTIVES[i % len(ADJECTIVES)]} photo of a {names[label].lower()} {PLACES[(i // 4) % len(PLACES)]}"
            writer.writerow([f"images/{i}.jpg", caption, label])
    return path


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cross_modal_job_classifies_captions_through_the_frozen_vit(workdir: Path, real_data):
    from data_helpers import make_cache, write_word_tokenizer

    src = workdir / "xmodal"
    tok = write_word_tokenizer(src / "tokenizer.json", list(PLACES) + ["small", "photo"])
    train = make_cache(_captioned_classes(src, "train", 48, 0), "folder", workdir / "xm_train")
    test = make_cache(_captioned_classes(src, "test", 24, 1000), "folder", workdir / "xm_test")
    dodo("submit", "jobs/weak_cross_modal.yaml", f"model.tokenizer={tok}", f"data.train_cache={train}",
         f"data.eval_cache={test}", "cluster.max_restarts=0", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "weak_cross_modal")
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["initial"], summary["final"]
    assert last["eval.reprogram_top1"] > first["eval.reprogram_top1"] + 0.2, (first, last)
    assert last["eval.loss"] < first["eval.loss"]
    assert summary["trainable_parameters"] == 64 * 64 + 64  # the linear token map only
