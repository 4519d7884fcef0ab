"""R-Adapter as its paper trains it for classification: class names through templates as the
text side, same-class pairs as MPM-NCE positives (model.clip.text_source=class_templates,
refused at submit on data without labels), and BMA (the uniform running mean of the adapter
weights) as the alternative to EMA, against a hand-computed mean, across a resume. End to end:
a 2-rank run on an ImageNet-folder cache, then `dodo eval RUN --wise` reports zero-shot and kNN
per dataset (ID and OOD) at each alpha."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import dodo, run_dirs
from dodo.adapters.config import RAdapterConfig
from dodo.adapters.r_adapter import RAdapterLinear


# ---------------------------------------------------------------- BMA


def bma_layer(start: int, every: int = 1) -> RAdapterLinear:
    torch.manual_seed(0)
    layer = RAdapterLinear(nn.Linear(4, 4).double(), RAdapterConfig(drop_prob=0.0, ema_kind="bma", bma_start=start))
    layer.double().train()
    layer.ema_every = every
    return layer


def run_steps(layer: RAdapterLinear, weights: list[torch.Tensor], scales: list[float], every: int = 1) -> None:
    """Per optimizer step: ``every`` training forwards (gradient accumulation), then the
    'optimizer' sets the weights of that step."""
    x = torch.randn(3, 4, dtype=torch.float64)
    for w, s in zip(weights, scales):
        for _ in range(every):
            layer(x)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.scale.fill_(s)


@pytest.mark.parametrize("every", [1, 2])
def test_bma_is_the_uniform_mean_from_the_start_step(every):
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(6)]
    ss = [0.1 * (t + 1) for t in range(6)]
    layer = bma_layer(start=3, every=every)
    run_steps(layer, ws[:2], ss[:2], every)  # steps 1, 2 done; W_2 not yet folded (next forward)
    layer(torch.zeros(1, 4, dtype=torch.float64))  # start of step 3: folds W_2 (before the start: tracks)
    torch.testing.assert_close(layer.ema_weight, ws[1], rtol=0, atol=0)
    layer = bma_layer(start=3, every=every)
    run_steps(layer, ws, ss, every)
    layer(torch.zeros(1, 4, dtype=torch.float64))  # the forward of step 7 folds W_6
    torch.testing.assert_close(layer.ema_weight, torch.stack(ws[2:]).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.ema_scale, torch.tensor([sum(ss[2:]) / 4], dtype=torch.float64))
    assert int(layer.bma_step) == 7
    layer.eval()  # evaluation uses the mean
    x = torch.randn(2, 4, dtype=torch.float64)
    y = layer.base(x)
    torch.testing.assert_close(layer(x), y + layer.ema_scale * (y @ layer.ema_weight))


def test_bma_resumes_from_its_checkpointed_state():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    ss = [0.2] * 5
    straight = bma_layer(start=1)
    run_steps(straight, ws, ss)
    straight(torch.zeros(1, 4, dtype=torch.float64))
    first = bma_layer(start=1)
    run_steps(first, ws[:3], ss[:3])  # checkpoint after step 3 (module state: weights + buffers)
    resumed = bma_layer(start=1)  # a new process: its forward counter starts at 0
    resumed.load_state_dict(first.state_dict())
    run_steps(resumed, ws[3:], ss[3:])
    resumed(torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(resumed.ema_weight, straight.ema_weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.ema_weight, torch.stack(ws).mean(0), rtol=1e-12, atol=1e-12)


def test_ema_unchanged_by_the_bma_switch():
    layer = RAdapterLinear(nn.Linear(4, 4).double(), RAdapterConfig(drop_prob=0.0, ema_momentum=0.5)).double().train()
    assert not hasattr(layer, "bma_step")  # EMA checkpoints keep their keys
    w = torch.ones(4, 4, dtype=torch.float64)
    run_steps(layer, [w, 2 * w], [0.1, 0.1])
    layer(torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(layer.ema_weight, 0.5 * (0.5 * 0 + 0.5 * w) + 0.5 * 2 * w)


# ---------------------------------------------------------------- class templates


def _job(cache: Path, class_names: str = "", class_templates: str = "") -> SimpleNamespace:
    clip = SimpleNamespace(text_source="class_templates", class_names=class_names, class_templates=class_templates)
    return SimpleNamespace(model=SimpleNamespace(clip=clip), data=SimpleNamespace(
        train_cache=str(cache), seed=0, kind="hdf5", synthetic_on_first_use=False))


def test_class_templates_texts_and_same_class_positives(real_data):
    from dodo.data.collate import CaptionCollator
    from dodo.data.dataset import CachedDataset
    from dodo.data.tokenizer import load_tokenizer
    from dodo.eval import classnames as cn
    from dodo.losses import positives_from_ids
    from dodo.models.clip.class_text import check_text_source, wrap_datasets

    cache = real_data["imagenet_train"]
    job = _job(cache)
    check_text_source(job)  # labelled, with class names: accepted
    base = CachedDataset(str(cache), verify="none")
    train, held = wrap_datasets(job, base, base)
    names, temps = cn.classnames("", base.manifest.classnames), cn.templates("", "imagenet1k")
    assert len(temps) > 10 and names == base.manifest.classnames  # clip_benchmark's ImageNet prompts
    samples = [train[i] for i in range(len(train))]
    labels = [base[i].label for i in range(len(base))]
    assert len(set(labels)) == 4
    for i, s in enumerate(samples):
        assert s.caption in {t.format(names[labels[i]]) for t in temps} and s.image_id == labels[i]
    assert len({s.caption for s in samples}) > 8  # images spread over the templates
    assert held[0].image_id == base[0].image_id and held[0].caption == samples[0].caption
    batch = CaptionCollator(load_tokenizer(str(real_data["tokenizer"])), 16)(samples[:12])
    pos = positives_from_ids(batch["image_ids"])
    lab = torch.tensor(labels[:12])
    assert torch.equal(pos, lab[:, None] == lab[None, :]) and int(pos.sum()) > 12  # same class = positive
    with pytest.raises(Exception, match="class_names"):
        check_text_source(_job(cache, class_names="clip_benchmark:cifar10"))  # 10 names, 4 classes


def test_class_templates_refused_without_labels(workdir: Path, real_data):
    for data in (["data.kind=synthetic"],
                 ["data.kind=hdf5", f"data.train_cache={real_data['coco_test']}", "data.synthetic_on_first_use=false",
                  f"model.tokenizer={real_data['tokenizer']}"]):
        proc = dodo("submit", "jobs/clip_r_adapter.yaml", "model.clip.text_source=class_templates", *data,
                    f"runs_dir={workdir}/runs", cwd=workdir, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dodo: error:"), proc.stderr
        assert "model.clip.text_source" in lines[0] and "label" in lines[0], lines[0]
        assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_classification_finetuning_and_wise_suites_per_dataset(workdir: Path, real_data):
    c = real_data
    suites = (f"eval.suites=[{{kind: zeroshot, datasets: [{{name: imagenet, cache: '{c['imagenet_val']}', tag: id}}]}}, "
              f"{{kind: knn, k: 5, datasets: [{{name: imagenet, cache: '{c['imagenet_val']}', "
              f"train_cache: '{c['imagenet_train']}', tag: id}}, {{name: cifar10, cache: '{c['cifar10_test']}', "
              f"train_cache: '{c['cifar10_train']}', tag: ood}}]}}]")
    out = dodo("submit", "jobs/clip_r_adapter.yaml", "data.kind=hdf5", f"data.train_cache={c['imagenet_train']}",
               f"data.eval_cache={c['imagenet_val']}", "data.synthetic_on_first_use=false",
               f"model.tokenizer={c['tokenizer']}", "data.max_caption_tokens=16", "model.clip.text_source=class_templates",
               "model.adapter.r_adapter.ema_kind=bma", "model.adapter.r_adapter.bma_start=8", "train.steps=24",
               "train.micro_batch=8", "train.warmup_steps=2", "train.lr=2e-3", "train.save_every=24",
               "train.eval_every=1000", "eval.wise_alphas=[0.0,0.8,1.0]", suites,
               f"runs_dir={workdir}/runs", cwd=workdir, timeout=600)
    assert out.returncode == 0, out.stdout
    (run,) = run_dirs(workdir / "runs", "clip_r_adapter")
    final = json.loads((run / "summary.json").read_text())["final"]
    ev = dodo("eval", str(run), "--wise", cwd=workdir, timeout=600)
    print(ev.stdout)
    rows = json.loads((run / "eval" / "wise.json").read_text())["rows"]
    for key in ("zeroshot.imagenet.top1", "knn.imagenet.top1", "knn.cifar10.top1", "knn.ood_mean.top1"):
        assert all(key in r for r in rows), (key, rows[0])
    # alpha = 0.8 is the job's own re-scaling (r_adapter.alpha=0.8) that its suites scored; 0 the start.
    for key in ("zeroshot.imagenet.top1", "knn.cifar10.top1"):
        assert rows[1][key] == pytest.approx(final[f"eval.{key}"], abs=1e-6), key
    assert rows[1]["zeroshot.imagenet.top1"] > rows[0]["zeroshot.imagenet.top1"]
    # The suites rerun on the final checkpoint (what `dodo table --rescored` reads) equal training's.
    dodo("eval", str(run), "--task", "suites", cwd=workdir, timeout=600)
    again = json.loads((run / "eval" / "suites.json").read_text())["final"]
    suite_keys = [k for k in final if k.startswith(("eval.zeroshot.", "eval.knn."))]
    assert suite_keys and sorted(again) == sorted(suite_keys)
    for key in suite_keys:
        assert again[key] == pytest.approx(final[key], abs=1e-6), key
