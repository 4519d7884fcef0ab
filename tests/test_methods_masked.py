"""Masked adapters: the MIM / MLM pretext tasks and their held-out metrics (hand-checked),
starting a run from the adapters of earlier runs, and the 2-rank chain MIM + MLM -> transfer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, dodo, run_dirs
from dodo import losses
from dodo.config.loader import dump_config, load_job
from dodo.config.preflight import missing_paths
from dodo.models.clip.task_masked import EVAL_SEED, MaskedTask
from dodo.tasks import build_task
from dodo.train.init_from import read_init

FAST = ["data.num_train=64", "data.num_eval=48", "eval.num_ood=8", "eval.ood_holdout=[]"]


def task_for(job: str, *overrides: str):
    torch.manual_seed(0)
    cfg = load_job(REPO / f"jobs/{job}.yaml", [*FAST, *overrides])
    return build_task(cfg, read_init(cfg))  # as the trainer does: other runs' tensors first


def whole_eval_batch(task):
    return task.collate([task.eval_set[i] for i in range(len(task.eval_set))])


def test_mim_task_metric_matches_hand_computation():
    task = task_for("masked_adapters_mim")
    assert isinstance(task, MaskedTask)
    model = task.model.eval()
    with torch.no_grad():  # a decoder that predicts 0: L1 = mean |normalised pixels| of masked patches
        model.mim_decoder.weight.zero_()
        model.mim_decoder.bias.zero_()
    state = torch.get_rng_state()
    got = task.evaluate(model, 8, 0, 1)
    assert torch.equal(torch.get_rng_state(), state), "evaluation must not move the training RNG"
    images = whole_eval_batch(task)["images"]
    torch.manual_seed(EVAL_SEED)
    n = (32 // 8) ** 2
    mask = losses.random_patch_mask(len(images), n, 0.6)
    assert int(mask.sum()) == len(images) * round(0.6 * n)
    target = losses.patchify(images, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    want = float(target.abs().mean(-1)[mask].mean())
    assert got["eval.mim_l1"] == pytest.approx(want, rel=1e-5)
    assert got["eval.loss"] == pytest.approx(want, rel=1e-5)
    assert task.evaluate(model, 8, 0, 1) == got  # fixed held-out masks


def test_mlm_task_accuracy_matches_hand_computation():
    task = task_for("masked_adapters_mlm")
    model = task.model.eval()
    batch = whole_eval_batch(task)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(EVAL_SEED)
    _, labels = losses.mask_tokens(ids, attn, model.mask_token_id, model.vocab_size, [model.eos_token_id], 0.15)
    picked = labels[labels != losses.IGNORE_INDEX]
    guess = int(picked.mode().values)  # a head that always says the most common masked token
    with torch.no_grad():
        model.mlm_head.weight.zero_()
        model.mlm_head.bias.zero_()
        model.mlm_head.bias[guess] = 10.0
    got = task.evaluate(model, 8, 0, 1)
    assert got["eval.mlm_accuracy"] == pytest.approx(float((picked == guess).float().mean()), abs=1e-6)
    assert 0 < got["eval.mlm_accuracy"] < 1


def test_pretext_objectives_train_only_their_tower():
    for job, tower, other in (("masked_adapters_mim", "vision", "text_model"),
                              ("masked_adapters_mlm", "text", "vision_model")):
        task = task_for(job)
        model = task.model.train()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and not any(other in n for n in trainable), trainable
        batch = whole_eval_batch(task)
        loss = model(batch["images"][:8], batch["input_ids"][:8], batch["attention_mask"][:8])
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), job


def fake_run(root: Path, cfg, model) -> Path:
    """A run directory as `dodo submit` leaves it: config.yaml and one published checkpoint
    holding the trainable state (the layout DeepSpeed's engine writes, read by dodo eval)."""
    run = root / cfg.name / "1"
    ckpt = run / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"module": state}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "dodo_meta.json").write_text(json.dumps({"step": 5, "world_size": 2}))
    return run


def trained_pretext(job: str, tmp_path: Path):
    task = task_for(job)
    with torch.no_grad():  # weights that differ from any fresh init
        for p in task.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return task.model, fake_run(tmp_path, task.cfg, task.model)


def test_transfer_loads_the_saved_adapters_frozen_and_adds_new_ones(tmp_path: Path):
    mim_model, mim_run = trained_pretext("masked_adapters_mim", tmp_path)
    mlm_model, mlm_run = trained_pretext("masked_adapters_mlm", tmp_path)
    task = task_for("masked_adapters_transfer", f"model.clip.init_adapters=[{mim_run}, {mlm_run}]")
    model = task.model
    params = dict(model.named_parameters())
    for src_model, run in ((mim_model, mim_run), (mlm_model, mlm_run)):
        names = model.init_adapters[str(run)]
        assert names
        saved = dict(src_model.named_parameters())
        for n in names:  # the new MLP adapters wrap the loaded ones: mlp.X -> mlp.base.X
            wrapped = n.replace(".mlp.", ".mlp.base.", 1)
            now = wrapped if wrapped in params else n
            assert torch.equal(params[now], saved[n]) and not params[now].requires_grad, n
    # Pretext heads stay behind; the loaded adapters are frozen; only the new adapters,
    # projections and temperature train.
    assert not hasattr(model, "mim_decoder") and not hasattr(model, "mlm_head")
    loaded = {n for names in model.init_adapters.values() for n in names}
    frozen_values = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen_values) > len(loaded)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("lora_" in n or "dodo_prefix" in n for n in trainable), trainable
    # The frozen base is the pretext runs' base (same init_seed): equal tower weights.
    base = "clip.vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(model.state_dict()[base], mim_model.state_dict()[base])
    # The loaded adapters act: the text features differ from the same model without them.
    baseline = task_for("masked_adapters_transfer").model.eval()
    batch = whole_eval_batch(task)
    with torch.no_grad():
        a = model.eval().encode_text(batch["input_ids"][:4], batch["attention_mask"][:4])
        b = baseline.encode_text(batch["input_ids"][:4], batch["attention_mask"][:4])
    assert not torch.allclose(a, b)


def test_loaded_values_equal_saved(tmp_path: Path):
    """Direct check on the names the pretext run saved (before any wrapping renames them)."""
    mim_model, mim_run = trained_pretext("masked_adapters_mim", tmp_path)
    task = task_for("masked_adapters_transfer", f"model.clip.init_adapters=[{mim_run}]", "model.adapter.kind=none")
    saved = {n: p for n, p in mim_model.named_parameters() if p.requires_grad and "lora_" in n}
    got = dict(task.model.named_parameters())
    assert set(task.model.init_adapters[str(mim_run)]) == set(saved)
    for n, p in saved.items():
        assert torch.equal(got[n], p) and not got[n].requires_grad


def test_init_adapters_errors_are_clear(tmp_path: Path):
    cfg = load_job(REPO / "jobs/masked_adapters_transfer.yaml", [f"model.clip.init_adapters=[{tmp_path}/nope]"])
    (msg,) = missing_paths(cfg)
    assert "model.clip.init_adapters[0]" in msg and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a dodo run directory"):
        task_for("masked_adapters_transfer", f"model.clip.init_adapters=[{tmp_path}/empty]")
    run = tmp_path / "r" / "1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_job(REPO / "jobs/masked_adapters_mim.yaml", FAST)))
    with pytest.raises(FileNotFoundError, match="no published checkpoint"):
        task_for("masked_adapters_transfer", f"model.clip.init_adapters=[{run}]")
    _, mim_run = trained_pretext("masked_adapters_mim", tmp_path)
    with pytest.raises(ValueError, match="init_seed"):
        task_for("masked_adapters_transfer", f"model.clip.init_adapters=[{mim_run}]", "model.init_seed=7")


def test_submit_refuses_a_missing_source(workdir: Path):
    out = dodo("submit", "jobs/masked_adapters_transfer.yaml", f"runs_dir={workdir}/runs",
               f"model.clip.init_adapters=[{workdir}/runs/masked_adapters_mim/missing]", cwd=workdir, check=False)
    assert out.returncode == 2 and "model.clip.init_adapters[0]" in out.stderr, out.stderr
    assert not (workdir / "runs" / "masked_adapters_transfer").exists() or not run_dirs(
        workdir / "runs", "masked_adapters_transfer")


SMALL = ["data.num_train=800", "data.num_eval=128", "eval.num_ood=96", "train.steps=60", "train.save_every=60",
         "train.eval_every=1000", "train.log_every=20", "eval.knn_bank=256"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_masked_adapters_chain_on_two_ranks(workdir: Path):
    """MIM and MLM pretext runs, then the transfer run starting from both: each stage
    improves its own held-out metric."""
    runs = workdir / "runs"
    summaries = {}
    for job in ("masked_adapters_mim", "masked_adapters_mlm"):
        dodo("submit", f"jobs/{job}.yaml", *SMALL, f"runs_dir={runs}", cwd=workdir, timeout=600)
        (run,) = run_dirs(runs, job)
        summaries[job] = (run, json.loads((run / "summary.json").read_text()))
    mim, mlm = summaries["masked_adapters_mim"][1], summaries["masked_adapters_mlm"][1]
    assert mim["final"]["eval.mim_l1"] < mim["initial"]["eval.mim_l1"] - 0.05
    assert mlm["final"]["eval.mlm_accuracy"] > mlm["initial"]["eval.mlm_accuracy"] + 0.2
    sources = ", ".join(str(summaries[j][0]) for j in ("masked_adapters_mim", "masked_adapters_mlm"))
    out = dodo("submit", "jobs/masked_adapters_transfer.yaml", *SMALL, f"runs_dir={runs}",
               f"model.clip.init_adapters=[{sources}]", cwd=workdir, timeout=600)
    (run,) = run_dirs(runs, "masked_adapters_transfer")
    s = json.loads((run / "summary.json").read_text())
    assert s["final"]["eval.id.r_mean"] > s["initial"]["eval.id.r_mean"] + 0.2, out.stdout
    assert s["final"]["eval.ood.r_mean"] > s["initial"]["eval.ood.r_mean"] + 0.1
    # Only the new adapters, projections and temperature are trainable (checkpointed).
    assert s["trainable_parameters"] < mim["trainable_parameters"] + mlm["trainable_parameters"]
