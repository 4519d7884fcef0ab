"""VLMo's stagewise pretraining end to end, 2 ranks per stage through `dodo submit`:
mim on an image-only class-folder cache, mlm on a text-corpus cache from the mim run, vl
(ITC + VL head + ITM + MLM, all-gathered) on a Karpathy-COCO cache from the mlm run, each
stage taking the earlier run directory by ``model.vlmo.init_from``. The runs are tiny (a few
steps): they show the chain works and what each stage trains, not results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import dodo, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SHORT = ["train.steps=4", "train.micro_batch=8", "train.warmup_steps=1", "train.log_every=1", "train.save_every=4",
         "train.eval_every=1000", "data.kind=hdf5", "data.synthetic_on_first_use=false", "data.max_caption_tokens=16"]


def _submit(workdir: Path, job: str, *args: str) -> tuple[Path, dict]:
    out = dodo("submit", f"jobs/{job}.yaml", *SHORT, *args, cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", job)
    return run, json.loads((run / "summary.json").read_text())


def _state(run: Path) -> dict[str, torch.Tensor]:
    from dodo.train.init_from import MODEL_STATES

    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))
    return torch.load(ckpt / MODEL_STATES, map_location="cpu", weights_only=False)["module"]


def test_three_stages_chain_through_init_from(workdir: Path, real_data) -> None:
    from dodo.train.init_from import read_stage_weights

    c, tok = real_data, f"model.tokenizer={real_data['tokenizer']}"
    mim, s1 = _submit(workdir, "vlmo_stage_mim", tok, f"data.train_cache={c['imagenet_train']}",
                      f"data.eval_cache={c['imagenet_val']}")
    mlm, s2 = _submit(workdir, "vlmo_stage_mlm", tok, f"data.train_cache={c['text']}", "data.num_eval=16",
                      f"model.vlmo.init_from={mim}")
    vl, s3 = _submit(workdir, "vlmo_stage_vl", tok, f"data.train_cache={c['coco_train']}",
                     f"data.eval_cache={c['coco_test']}", f"model.vlmo.init_from={mlm}", "eval.ood_holdout=[]",
                     "model.vlmo.rerank_k=2")
    assert 0 <= s1["final"]["eval.mim_accuracy"] <= 1 and 0 <= s2["final"]["eval.mlm_accuracy"] <= 1
    assert "eval.id.itm_r_mean" in s3["final"] and s3["final"]["eval.loss"] > 0

    # What each stage trained (checkpoints hold trainable tensors only).
    first, second = _state(mim), _state(mlm)
    assert "blocks.0.attn.q_proj.weight" in first and "blocks.0.experts.image.fc1.weight" in first
    assert not any(".experts.text." in k or k.startswith("word_embed") for k in first)
    assert "blocks.0.experts.text.fc1.weight" in second and "word_embed.weight" in second
    assert not any(".attn." in k or ".experts.image." in k for k in second)
    # The vl stage started from both: mim's attention, mlm's text expert (merged chain).
    merged = read_stage_weights(str(mlm), "vlmo")
    assert torch.equal(merged["blocks.0.attn.q_proj.weight"], first["blocks.0.attn.q_proj.weight"])
    assert torch.equal(merged["blocks.1.experts.text.fc2.weight"], second["blocks.1.experts.text.fc2.weight"])
    third = _state(vl)  # everything trains in vl, and moved from where the chain left it
    assert not torch.equal(third["blocks.0.attn.q_proj.weight"], first["blocks.0.attn.q_proj.weight"])


def test_stage_on_a_cache_without_its_modality_is_refused(workdir: Path, real_data) -> None:
    tok = f"model.tokenizer={real_data['tokenizer']}"
    for job, cache, word in (("vlmo_stage_mim", "text", "text-only"), ("vlmo_stage_mlm", "imagenet_train", "image-only"),
                             ("vlmo_stage_vl", "text", "text-only")):
        proc = dodo("submit", f"jobs/{job}.yaml", *SHORT, tok, f"data.train_cache={real_data[cache]}",
                    "data.num_eval=16", cwd=workdir, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dodo: error:"), proc.stderr
        assert "data.train_cache" in lines[0] and word in lines[0] and f"model.vlmo.stage" in lines[0], lines
    proc = dodo("submit", "jobs/vlmo_stage_vl.yaml", "model.vlmo.init_from=/no/such/run", cwd=workdir, check=False)
    assert proc.returncode == 2 and "model.vlmo.init_from" in proc.stderr
    assert not (workdir / "runs").exists()
