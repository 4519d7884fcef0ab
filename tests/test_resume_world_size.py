"""Resume on another world size: 2 ranks stop at step 10, 1 rank resumes through DeepSpeed's
universal checkpoint and finishes. Real runs: `dodo submit` with ZeRO-2 on gloo."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, dodo, metrics, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SHORT = [*TINY, "train.steps=20", "train.save_every=10", "train.steps_per_allocation=10",
         "train.micro_batch=8", "train.grad_accum=1"]

# What a 1-rank engine holds right after loading the 2-rank step-10 checkpoint: a real Trainer,
# built the way `dodo run` builds it, its trainable weights saved for the test to compare.
LOAD_ON_ONE_RANK = textwrap.dedent("""
    import sys, torch
    from dodo.cluster.env import discover
    from dodo.config.loader import load_job
    from dodo.rundir import RunDir
    from dodo.train.loop import Trainer
    run = RunDir.open(sys.argv[1])
    trainer = Trainer(load_job(run.config, sys.argv[3:]), run, discover())
    assert trainer.step == 10, trainer.step
    torch.save({k: v.detach().clone() for k, v in trainer.engine.module.named_parameters() if v.requires_grad},
               sys.argv[2])
    trainer.close()
""")


def test_resume_two_ranks_on_one(tmp_path: Path):
    first = dodo("submit", str(REPO / "jobs/demo.yaml"), *SHORT, f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert first.returncode == 3, first.stdout
    (run,) = run_dirs(tmp_path / "runs", "demo")
    step10 = run / "checkpoints" / "step_00000010"
    saved = torch.load(step10 / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all(".adapter." in k or k.startswith("prefix.") for k in saved)

    from dodo.cluster.local import free_port, rank_environment

    loaded_file = tmp_path / "loaded.pt"
    subprocess.run([sys.executable, "-c", LOAD_ON_ONE_RANK, str(run), str(loaded_file),
                    "cluster.tasks_per_node=1", "train.grad_accum=2"],
                   env=rank_environment(0, 1, free_port(), 1), cwd=tmp_path, check=True,
                   capture_output=True, text=True, timeout=120)
    loaded = torch.load(loaded_file)
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    universal = run / "checkpoints" / "universal"
    assert (universal / "latest_universal").read_text().strip() == "step_00000010"
    assert not [p for p in universal.iterdir() if p.name.startswith(".tmp_")]

    second = dodo("submit", str(run), "cluster.tasks_per_node=1", "train.grad_accum=2", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "overrides for this resume recorded in" in second.stdout
    assert "cluster.tasks_per_node: 2 -> 1" in second.stdout
    log = (run / "job" / "logs" / "rank_0.log").read_text()
    assert "at step 10 (written by 2 ranks, now 1" in log
    # The restored tensors were checked against the checksums saved with the checkpoint.
    n = len((step10 / "dodo_checksums.json").read_text().splitlines()) - 2
    assert n == len(saved) and f"checksums of all {n} trainable tensors match" in log
    rows = metrics(run)
    steps = [r["step"] for r in rows if "train.loss" in r]
    assert steps == list(range(1, 21))
    evals = [r for r in rows if "eval.loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[-1]["eval.loss"] < evals[0]["eval.loss"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def test_resume_refuses_changed_global_batch_and_other_keys(tmp_path: Path):
    """Refusals before anything runs: a fake stopped run directory is enough (config.yaml only)."""
    dry = dodo("submit", str(REPO / "jobs/demo.yaml"), *SHORT, f"runs_dir={tmp_path}/runs", "--dry-run",
               cwd=tmp_path)
    config = dry.stdout.split("# resolved config (a valid job file)\n", 1)[1].split("# launch plan", 1)[0]
    run = tmp_path / "runs" / "demo" / "fake"
    (run / "job" / "logs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "config.yaml").write_text(config)

    bad = dodo("submit", str(run), "cluster.tasks_per_node=1", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "global batch train.micro_batch x train.grad_accum x ranks" in bad.stderr
    assert "from 8 x 1 x 2 = 16 to 8 x 1 x 1 = 8" in bad.stderr

    other = dodo("submit", str(run), "cluster.tasks_per_node=1", "train.grad_accum=2", "train.lr=1.0",
                 cwd=tmp_path, check=False)
    assert other.returncode == 2
    assert "train.lr cannot change on resume" in other.stderr
    assert "cluster.*, train.micro_batch, train.grad_accum" in other.stderr
    assert (run / "config.yaml").read_text() == config  # nothing rewritten
