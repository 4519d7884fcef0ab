"""A tiny 2-rank MAGMA run through `dodo submit` from local checkpoints: the LM from a Hugging Face
directory (GPT-2, sharded safetensors), the image encoder from an open_clip file (a tiny modified
ResNet of RN50x16's family, its attention pool removed: the grid tokens). Bad sources are
refused at submit: one line, exit 2, no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from conftest import TINY, dodo, metrics, run_dirs
from dodo.models.sources.config import SourceConfig
from dodo.models.sources.libs import import_open_clip
from dodo.models.sources.openclip import model_config

TINY_RN = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 4},
           "text_cfg": {"width": 16, "heads": 2, "layers": 1}}


def _checkpoints(root: Path) -> tuple[str, str]:
    torch.manual_seed(0)
    from dodo.data.tokenizer import load_tokenizer
    vocab = len(load_tokenizer("builtin:synthetic"))
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          initializer_range=0.1))
    lm.save_pretrained(str(root / "gpt2"), max_shard_size="50KB")
    mc = model_config(SourceConfig(kind="random", arch="RN50x16", arch_kwargs=json.dumps(TINY_RN)))
    clip = import_open_clip().model.CLIP(**mc)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "rn.safetensors"))
    return str(root / "gpt2"), str(root / "rn.safetensors")


def _job(workdir: Path, lm: str, rn: str, arch: str = "RN50x16", file: str = "sources.yaml") -> str:
    job = workdir / file
    job.write_text(
        "defaults: [model/tiny, adapter/bottleneck, data/synthetic_hdf5, deepspeed/zero2, train/demo, cluster/local]\n"
        "name: sources\n"
        "model:\n"
        f"  lm: {{source: {{kind: hf, path: {lm}}}}}\n"
        f"  image_encoder: {{source: {{kind: open_clip, path: {rn}, arch: {arch}, grid: true,\n"
        f"                  arch_kwargs: '{json.dumps(TINY_RN)}'}}}}\n")
    return str(job)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_magma_trains_from_local_checkpoints(workdir: Path):
    lm, rn = _checkpoints(workdir)
    dodo("submit", _job(workdir, lm, rn), *TINY, "train.steps=4", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "sources")
    losses = [m["train.loss"] for m in metrics(run) if "train.loss" in m]
    assert len(losses) >= 4 and all(l == l for l in losses)  # finite: NaN != NaN
    log = (run / "job/logs/rank_0.log").read_text()
    assert "Traceback" not in log
    state = torch.load(sorted((run / "checkpoints").glob("*/mp_rank_00_model_states.pt"))[-1],
                       map_location="cpu", weights_only=False)["module"]
    # the prefix reads the RN grid: 32 x width 4 = 128 channels (tiny's random ViT would give 64)
    assert state["prefix.0.weight"].shape == (32, 128)


@pytest.mark.slow  # three `dodo submit --dry-run` processes
def test_bad_sources_refused_at_submit(workdir: Path):
    lm, rn = _checkpoints(workdir)
    cases = [(_job(workdir, str(workdir / "nope"), rn, file="a.yaml"), "model.lm.source.path"),
             (_job(workdir, lm, rn, arch="RN50x61", file="b.yaml"), "not an architecture open_clip knows"),
             (_job(workdir, lm, lm + "/config.json", file="c.yaml"), "is not a checkpoint file"),
             (_job(workdir, str(workdir / "big"), rn, file="d.yaml"),
              "model.tokenizer: the tokenizer has 22 tokens but the LM's embedding has 500 rows")]
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=500, n_positions=64, n_embd=32, n_layer=1, n_head=2)) \
        .save_pretrained(str(workdir / "big"))  # another LM's vocabulary
    for job, message in cases:
        proc = dodo("submit", job, *TINY, cwd=workdir, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_clip_trains_from_local_hf_directory(workdir: Path):
    """The contrastive family from a Hugging Face CLIP directory (sharded safetensors)."""
    from dodo.data.tokenizer import load_tokenizer
    torch.manual_seed(0)
    vocab = len(load_tokenizer("builtin:synthetic"))
    clip = tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=0, pad_token_id=0,
                         bos_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2), projection_dim=16))
    clip.save_pretrained(str(workdir / "clip"), max_shard_size="50KB")
    dodo("submit", "jobs/clip_lora.yaml", f"model.clip.path={workdir / 'clip'}", "data.num_train=256",
         "data.num_eval=16", "eval.num_ood=16", "train.micro_batch=8", "train.steps=3", "train.log_every=1",
         "train.eval_every=1000",
         "model.clip.max_text_len=32", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "clip_lora")
    losses = [m["train.loss"] for m in metrics(run) if "train.loss" in m]
    assert len(losses) >= 3 and all(l == l for l in losses)
