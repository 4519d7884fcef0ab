"""End to end on real-format data: a 2-rank CLIP job trains on a Karpathy-JSON COCO cache
(natural captions, 5 per image) with a local tokenizer, and its explicit eval suites score
retrieval (image-id positives, an OOD Flickr30k set), ImageNet-folder zero-shot, CIFAR kNN and a
linear probe into summary.json, and no process of the run imports the shapes generator. A suite
its data cannot feed is refused at submit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import dodo, run_dirs
from data_helpers import import_watch, watched_imports


@pytest.fixture
def caches(real_data) -> dict[str, Path]:
    return real_data  # session-scoped (conftest.py): built once for every real-data e2e test


def _common(c: dict[str, Path]) -> list[str]:
    return [f"data.kind=hdf5", f"data.train_cache={c['coco_train']}", f"data.eval_cache={c['coco_test']}",
            "data.synthetic_on_first_use=false", f"model.tokenizer={c['tokenizer']}",
            "data.max_caption_tokens=16", "train.log_every=1", "train.eval_every=1000"]


def _suites(c: dict[str, Path]) -> str:
    return ("eval.suites=[{kind: retrieval, datasets: [{name: coco, cache: '', tag: id}, "
            f"{{name: flickr, cache: '{c['flickr_test']}', tag: ood}}]}}, "
            f"{{kind: zeroshot, datasets: [{{name: imagenet, cache: '{c['imagenet_val']}'}}]}}, "
            f"{{kind: knn, k: 5, datasets: [{{name: cifar10, cache: '{c['cifar10_test']}', "
            f"train_cache: '{c['cifar10_train']}'}}]}}, "
            f"{{kind: linear_probe, datasets: [{{name: cifar10, cache: '{c['cifar10_test']}', "
            f"train_cache: '{c['cifar10_train']}'}}]}}]")


def test_zeroshot_on_unlabelled_data_is_refused_at_submit(workdir: Path, caches) -> None:
    bad = f"eval.suites=[{{kind: zeroshot, datasets: [{{name: coco, cache: '{caches['coco_test']}'}}]}}]"
    proc = dodo("submit", "jobs/clip_lora.yaml", *_common(caches), bad, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dodo: error:") and "label" in lines[0], proc.stderr
    assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_clip_on_real_formats_reports_every_suite(workdir: Path, caches, tmp_path: Path) -> None:
    # Every process of the run logs imports of the shapes generator's modules (none allowed).
    env, log = import_watch(tmp_path / "hook", ("dodo.data.synthetic", "dodo.data.ingest.synthetic",
                                                "dodo.tasks.shapes"))
    dodo("submit", "jobs/clip_lora.yaml", *_common(caches), _suites(caches), "train.steps=6",
         "train.micro_batch=8", "train.warmup_steps=1", cwd=workdir, timeout=600, env=env)
    processes, imports, text = watched_imports(log)
    assert processes >= 3 and not imports, text[-4000:]  # submit + 2 ranks ran the hook; no import
    (run,) = run_dirs(workdir / "runs", "clip_lora")
    final = json.loads((run / "summary.json").read_text())
    flat = json.dumps(final)
    for key in ("eval.retrieval.coco.t2i_r1", "eval.retrieval.flickr.i2t_r5", "eval.retrieval.ood_mean.r_mean",
                "eval.zeroshot.imagenet.top1", "eval.knn.cifar10.", "eval.linear_probe.cifar10."):
        assert key in flat, (key, flat[:2000])
