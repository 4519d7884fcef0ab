"""End to end on real-format data: a 2-rank MAGMA captioning job trains through `dodo submit` on
a Karpathy-JSON COCO cache (natural captions, 5 per image) with the local word-level tokenizer.
Its periodic evaluation scores BLEU-4 / CIDEr-D against all references of each held-out image
(not the shapes metrics), and its captioning suite reaches summary.json as
eval.captioning.<dataset>.bleu4 / cider, with a Flickr30k-format test set tagged OOD (the scorers are checked against pycocoevalcap run
directly in test_eval_captioning.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import dodo, metrics, run_dirs

def test_periodic_eval_scores_all_references_of_the_first_images() -> None:
    """MAGMA's evaluate on natural captions (3 per image): eval.bleu4 / eval.cider are
    pycocoevalcap's Bleu(4) / Cider of the generated captions of the first train.caption_samples
    (2 of 3) images against all their references, computed here by hand."""
    import numpy as np
    import torch
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from conftest import REPO
    from dodo.config.loader import load_job
    from dodo.data.sample import Sample
    from dodo.eval.caption_metrics import tokenize
    from dodo.tasks import build_task

    torch.manual_seed(0)
    task = build_task(load_job(REPO / "jobs/demo.yaml", [
        "data.kind=synthetic", "data.num_train=16", "data.num_eval=8", "train.caption_samples=2",
        "model.lm.d_model=32", "model.lm.n_head=2", "model.image_encoder.hidden=32"]))
    rng = np.random.default_rng(0)
    refs = {10: ["a man riding a bike on a city street", "a cyclist on a busy road", "a man on a bicycle"],
            11: ["two dogs playing in the snow", "dogs running in snow", "two brown dogs outside"],
            12: ["a bowl of soup on a table", "soup in a white bowl", "a table with a bowl"]}
    images = {k: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in refs}
    task.eval_set = [Sample(image=images[k], caption=c, key=f"{k}#{j}", image_id=k)
                     for k in refs for j, c in enumerate(refs[k])]
    model = task.model.eval()
    # The family's generate, replaced by one that answers each image with one of its own
    # references except the first (so scoring against the first reference alone would differ).
    answer = {images[k].tobytes(): refs[k][1 + k % 2] for k in refs}
    task.generate = lambda m, imgs, **decoding: [answer[np.asarray(im).tobytes()] for im in imgs]
    got = task.evaluate(model, 8, 0, 1)
    preds = {k: refs[k][1 + k % 2] for k in (10, 11)}  # the first 2 images only
    gts = {str(k): [tokenize(r) for r in refs[k]] for k in preds}
    res = {str(k): [tokenize(p)] for k, p in preds.items()}
    assert got["eval.bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert got["eval.cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert got["eval.cider"] > 1.0 and got["eval.bleu4"] > 0.3  # a reference scores high
    assert "eval.loss" in got and not any("accuracy" in k for k in got)


TINY_MAGMA = ["model.lm.d_model=32", "model.lm.n_head=2", "model.lm.n_positions=40",
              "model.image_encoder.hidden=32", "model.image_encoder.n_layer=1", "train.micro_batch=8",
              "train.log_every=50", "train.warmup_steps=5", "train.lr=1e-2"]


def real_magma(c: dict[str, Path]) -> list[str]:
    """Overrides that put jobs/demo.yaml (MAGMA, bottleneck adapters) on the real COCO caches."""
    return [*TINY_MAGMA, "data.kind=hdf5", f"data.train_cache={c['coco_train']}",
            f"data.eval_cache={c['coco_test']}", "data.synthetic_on_first_use=false",
            f"model.tokenizer={c['tokenizer']}", "data.max_caption_tokens=16"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_magma_captioning_on_karpathy_coco(workdir: Path, real_data) -> None:
    suites = ("eval.suites=[{kind: captioning, datasets: [{name: coco, cache: '', tag: id}, "
              f"{{name: flickr, cache: '{real_data['flickr_test']}', tag: ood}}]}}]")
    dodo("submit", "jobs/demo.yaml", *real_magma(real_data), suites, "train.steps=60", "train.eval_every=30",
         "train.caption_samples=8", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "demo")
    summary = json.loads((run / "summary.json").read_text())
    flat = json.dumps(summary)
    for key in ("eval.captioning.coco.bleu4", "eval.captioning.coco.cider", "eval.captioning.flickr.cider",
                "eval.captioning.ood_mean.bleu4"):
        assert key in flat, (key, flat[:2000])
    assert "caption_accuracy" not in flat  # no shapes scoring on real data
    # Periodic eval: BLEU-4 / CIDEr-D at step 0 and at every eval, on the first 8 held-out images
    # (the whole Karpathy test split of this cache: 8 images x 5 captions).
    evals = [m for m in metrics(run) if "eval.loss" in m]
    assert [m["step"] for m in evals] == [0, 30, 60]
    assert all(0 <= m["eval.bleu4"] <= 1 and m["eval.cider"] >= 0 for m in evals)
    assert evals[-1]["eval.loss"] < evals[0]["eval.loss"]
    # (CIDEr-D of this 2,224-parameter adapter on a frozen random LM is noise-level: ~0.001-0.03)
    # The suite on the held-out split scores the same 8 images with the same greedy decoder.
    last = evals[-1]
    assert last["eval.captioning.coco.cider"] == pytest.approx(last["eval.cider"])
    assert last["eval.captioning.coco.bleu4"] == pytest.approx(last["eval.bleu4"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_limber_job_on_karpathy_coco(workdir: Path, real_data) -> None:
    """jobs/limber.yaml on 2 ranks from the real COCO cache: only the linear map trains
    (image hidden 32 -> d_model 32: 32 * 32 + 32 parameters) and the held-out loss falls."""
    dodo("submit", "jobs/limber.yaml", *real_magma(real_data), "train.steps=40", "train.eval_every=40",
         "train.caption_samples=4", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "limber")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] == 32 * 32 + 32
    evals = [m for m in metrics(run) if "eval.loss" in m]
    assert evals[-1]["eval.loss"] < evals[0]["eval.loss"] and "eval.cider" in evals[-1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mae_lm_trains_on_two_ranks(workdir: Path, real_data) -> None:
    """MAE + LM through the MAGMA path (jobs/magma_mae.yaml): a frozen timm MAE ViT (a random-weight
    checkpoint saved as MAE's release wraps it) feeding a frozen LM through adapters, trained on
    the Karpathy-COCO cache on 2 ranks; the held-out caption loss falls."""
    import torch

    from dodo.models.sources.libs import import_timm

    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    mae = import_timm().create_model("vit_base_patch16_224.mae", pretrained=False, num_classes=0, **tiny)
    ckpt = workdir / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae.state_dict()}, ckpt)
    suites = f"eval.suites=[{{kind: captioning, datasets: [{{name: coco, cache: '', tag: id}}]}}]"
    dodo("submit", "jobs/magma_mae.yaml", *real_magma(real_data), suites,
         f"model.image_encoder.source.path={ckpt}", f"model.image_encoder.source.arch_kwargs='{json.dumps(tiny)}'",
         "model.image_encoder.source.dtype=float32", "model.image_encoder.image_size=32",
         "model.image_encoder.patch_size=8", "data.image_size=32", "data.num_workers=0", "data.verify=none",
         "model.lm.source.kind=random", "model.lm.source.path=''", "model.lm.arch=gpt2", "model.lm.n_layer=2",
         "--cluster", "local", "train.precision=fp32", "train.steps=40", "train.micro_batch=8", "train.grad_accum=1", "train.lr=1e-2",
         "train.warmup_steps=2", "train.eval_every=40", "train.save_every=40", "train.log_every=10",
         "train.caption_samples=4", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "magma_mae")
    evals = [m for m in metrics(run) if "eval.loss" in m]
    assert evals[-1]["eval.loss"] < evals[0]["eval.loss"], evals
    assert "eval.captioning.coco.cider" in json.dumps(json.loads((run / "summary.json").read_text()))
