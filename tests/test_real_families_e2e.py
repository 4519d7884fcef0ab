"""Every contrastive family on real-format data, 2 ranks through `dodo submit` to summary.json:
R-Adapter with MPM-NCE and VLMo retrieval on the Karpathy-COCO cache (retrieval suite over COCO
test + a Flickr30k OOD set), and the masked-adapter chain: MIM on an image-only class-folder
cache, MLM on a text-corpus cache, then the transfer stage on COCO from both runs' adapters.
Every run logs its imports (data_helpers.import_watch): none may load the shapes generator.

The caches are the session's (conftest.py real_data). The runs are tiny (4 steps, tiny towers):
their numbers only show the pipeline works, they are not results.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data_helpers as dh
from conftest import dodo, run_dirs

WATCHED = ("dodo.data.synthetic", "dodo.data.ingest.synthetic", "dodo.tasks.shapes")
SHORT = ["train.steps=4", "train.micro_batch=8", "train.warmup_steps=1", "train.log_every=1",
         "train.eval_every=1000", "data.kind=hdf5", "data.synthetic_on_first_use=false"]


def _data(c: dict[str, Path], train: str, eval_cache: str = "", **extra: str) -> list[str]:
    out = [f"data.train_cache={c[train]}", f"model.tokenizer={c['tokenizer']}", "data.max_caption_tokens=16"]
    out.append(f"data.eval_cache={c[eval_cache]}" if eval_cache else "data.num_eval=16")
    return out + [f"{k}={v}" for k, v in extra.items()]


def _retrieval(c: dict[str, Path]) -> str:
    return ("eval.suites=[{kind: retrieval, datasets: [{name: coco, cache: '', tag: id}, "
            f"{{name: flickr, cache: '{c['flickr_test']}', tag: ood}}]}}]")


def _submit(workdir: Path, job: str, *args: str, env: dict) -> dict:
    dodo("submit", f"jobs/{job}.yaml", *SHORT, *args, cwd=workdir, timeout=600, env=env)
    (run,) = run_dirs(workdir / "runs", job)
    return json.loads((run / "summary.json").read_text())


def _no_shapes(log: Path, runs: int) -> None:
    processes, imports, text = dh.watched_imports(log)
    assert processes >= 3 * runs, text[-2000:]  # the hook ran: submit + 2 ranks per run
    assert not imports, text[-4000:]


def _periodic_equals_suite(final: dict) -> None:
    """The in-training held-out retrieval (image-id positives) is the retrieval suite's on the
    same data: tr = image -> text (i2t), ir = text -> image (t2i)."""
    for k in (1, 5, 10):
        assert final[f"eval.id.tr_r{k}"] == pytest.approx(final[f"eval.retrieval.coco.i2t_r{k}"], abs=1e-6)
        assert final[f"eval.id.ir_r{k}"] == pytest.approx(final[f"eval.retrieval.coco.t2i_r{k}"], abs=1e-6)


# ---------------------------------------------------------------- fast checks


def test_flickr_stand_in_is_other_data_than_coco(real_data, tmp_path: Path) -> None:
    from dodo.data.dataset import CachedDataset

    js, _ = dh.write_karpathy(tmp_path / "f", 10, 5, "flickr30k")
    doc = json.loads(js.read_text())
    assert js.name == "dataset_flickr30k.json" and {i["split"] for i in doc["images"]} == {"train", "val", "test"}
    assert all(len(i["sentences"]) == 5 and "filepath" not in i for i in doc["images"])
    coco, flickr = CachedDataset(real_data["coco_test"]), CachedDataset(real_data["flickr_test"])
    assert len(flickr) == 5 * len({s.image_id for s in (flickr[i] for i in range(len(flickr)))})
    assert not {coco[i].caption for i in range(len(coco))} & {flickr[i].caption for i in range(len(flickr))}
    assert not np.array_equal(coco[0].image, flickr[0].image)


def test_pretext_stage_on_the_wrong_unimodal_cache_is_refused(workdir: Path, real_data) -> None:
    for job, cache, missing in (("masked_adapters_mim", "text", "text-only"),
                                ("masked_adapters_mlm", "imagenet_train", "image-only")):
        proc = dodo("submit", f"jobs/{job}.yaml", *SHORT, *_data(real_data, cache), cwd=workdir, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("dodo: error:") and "data.train_cache" in lines[0], lines
        assert missing in lines[0] and "dodo data cache" in lines[0], lines  # what is wrong, the fix
        assert not (workdir / "runs").exists()


def test_periodic_retrieval_counts_a_captions_own_image() -> None:
    """2 images x 2 captions; caption 1 of image A points at B. Hand-computed: A finds its own
    caption first; B's best captions tie with A's identical caption, a negative, so B is found
    first half the time (i2t R@1 = (1 + 1/2) / 2); 3 of 4 captions find their image (t2i R@1 =
    3/4). Caption identity is no longer a positive: B's two identical captions count once each."""
    from dodo.data.sample import Sample
    from dodo.tasks.contrastive import ContrastiveTask

    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    img = torch.stack([a, a, b, b])  # (4, 2): one row per caption sample
    txt = torch.stack([a, b, b, b])
    caps = ["a red bus", "a dog on grass", "a dog on grass", "a dog on grass"]
    ds = [Sample(image=np.zeros((2, 2, 3), np.uint8), caption=c, key=str(i), image_id=i // 2)
          for i, c in enumerate(caps)]
    stub = SimpleNamespace(embed=lambda model, d: (img, txt, caps),
                           cfg=SimpleNamespace(eval=SimpleNamespace(retrieval_ks=(1, 2))))
    m = ContrastiveTask.split_metrics(stub, None, ds, "id")  # type: ignore[arg-type]
    assert (m["eval.id.tr_r1"], m["eval.id.ir_r1"], m["eval.id.ir_r2"]) == (0.75, 0.75, 1.0)


def test_collator_text_only_batch_has_no_images(real_data) -> None:
    from dodo.data.collate import CaptionCollator
    from dodo.data.dataset import CachedDataset
    from dodo.data.tokenizer import load_tokenizer

    collate = CaptionCollator(load_tokenizer(str(real_data["tokenizer"])), 17)
    text, images = CachedDataset(real_data["text"]), CachedDataset(real_data["imagenet_val"])
    batch = collate([text[0], text[1]])
    assert batch["images"] is None and batch["input_ids"].shape[0] == 2 and "image_ids" not in batch
    assert collate([images[0], images[1]])["input_ids"].tolist() == [[collate.eos_id]] * 2  # caption ""
    with pytest.raises(ValueError, match="mixes text-only"):
        collate([text[0], images[0]])


# ---------------------------------------------------------------- 2-rank runs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_r_adapter_mpm_nce_and_vlmo_retrieval_on_karpathy(workdir: Path, real_data, tmp_path: Path) -> None:
    env, log = dh.import_watch(tmp_path / "hook", WATCHED)
    data = _data(real_data, "coco_train", "coco_test")
    for job in ("clip_r_adapter", "vlmo_retrieval"):
        final = _submit(workdir, job, *data, _retrieval(real_data), env=env)["final"]
        for key in ("eval.retrieval.coco.t2i_r1", "eval.retrieval.coco.i2t_r5", "eval.retrieval.flickr.r_mean",
                    "eval.retrieval.ood_mean.r_mean"):
            assert 0.0 <= final[key] <= 1.0, (job, key, final)
        _periodic_equals_suite(final)
    _no_shapes(log, 2)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_masked_chain_mim_images_mlm_text_then_transfer(workdir: Path, real_data, tmp_path: Path) -> None:
    from dodo.data.manifest import describe

    assert (describe(real_data["imagenet_train"]).modality, describe(real_data["text"]).modality) == ("image", "text")
    env, log = dh.import_watch(tmp_path / "hook", WATCHED)
    mim = _submit(workdir, "masked_adapters_mim", *_data(real_data, "imagenet_train", "imagenet_val"), env=env)
    mlm = _submit(workdir, "masked_adapters_mlm", *_data(real_data, "text"), env=env)
    assert 0.0 < mim["final"]["eval.mim_l1"] < 10.0 and 0.0 <= mlm["final"]["eval.mlm_accuracy"] <= 1.0
    (mim_run,) = run_dirs(workdir / "runs", "masked_adapters_mim")
    (mlm_run,) = run_dirs(workdir / "runs", "masked_adapters_mlm")
    final = _submit(workdir, "masked_adapters_transfer", *_data(real_data, "coco_train", "coco_test"),
                    f"model.clip.init_adapters=[{mim_run}, {mlm_run}]", _retrieval(real_data), env=env)["final"]
    assert 0.0 <= final["eval.retrieval.coco.r_mean"] <= 1.0 and "eval.retrieval.flickr.t2i_r5" in final
    _periodic_equals_suite(final)
    _no_shapes(log, 3)
