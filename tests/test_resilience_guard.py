"""Divergence guard: a NaN injected at a chosen step (DODO_INJECT_NAN_AT_STEP, a test hook read by
the training loop) is skipped or stops the run, agreed across 2 real ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, dodo, metrics, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
JOB = str(Path(__file__).parents[1] / "jobs/demo.yaml")


def trainable(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


def test_skip_drops_the_update_and_completes(tmp_path: Path):
    # NaN on rank 1 only: rank 0's loss is finite, yet both ranks must skip the same step.
    # cluster.signal_lead_s=0: every save is over the checkpoint-time budget, and says so.
    proc = dodo("submit", JOB, *TINY, "train.steps=6", "train.save_every=1", "train.keep_checkpoints=10",
                "train.on_nonfinite=skip", "cluster.signal_lead_s=0", f"runs_dir={tmp_path}/runs", cwd=tmp_path,
                env={"DODO_INJECT_NAN_AT_STEP": "4", "DODO_INJECT_NAN_RANK": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path / "runs", "demo")
    assert "non-finite loss and gradient norm at step 4: update skipped" in proc.stdout
    before, skipped, after = trainable(run, 3), trainable(run, 4), trainable(run, 5)
    for key in before:  # step 4 applied nothing; step 5 did update again, with finite weights
        assert torch.equal(before[key], skipped[key]), key
        assert torch.isfinite(after[key]).all(), key
    assert any(not torch.equal(skipped[k], after[k]) for k in before)
    rows = {r["step"]: r for r in metrics(run) if "train.loss" in r}
    assert 4 not in rows and rows[6]["train.skipped_steps"] == 1
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["save_seconds"] > 0
    assert "more than cluster.signal_lead_s=0" in proc.stdout and "set cluster.signal_lead_s=" in proc.stdout
    assert "warning: checkpoint save took" in dodo("status", str(run), cwd=tmp_path).stdout


def test_stop_names_the_step_and_last_good_checkpoint(tmp_path: Path):
    # ZeRO-0 here (a plain torch optimizer); the other tests run ZeRO-2 (the demo's stage).
    proc = dodo("submit", JOB, *TINY, "train.steps=8", "train.save_every=2", "deepspeed.zero_stage=0",
                f"runs_dir={tmp_path}/runs", cwd=tmp_path, check=False,
                env={"DODO_INJECT_NAN_AT_STEP": "5", "DODO_INJECT_NAN_RANK": "all"})
    assert proc.returncode == 4, proc.stdout + proc.stderr
    (run,) = run_dirs(tmp_path / "runs", "demo")
    good = run / "checkpoints" / "step_00000004"
    assert f"training diverged: non-finite loss and gradient norm at step 5" in proc.stdout
    assert f"last good checkpoint {good} (step 4)" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run / "checkpoints" / "step_00000006").exists()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["last_good_checkpoint"] == str(good)
    assert "restart" not in proc.stderr  # a divergence is not retried: it would happen again


def test_skip_cap_stops_after_consecutive_skips(tmp_path: Path):
    proc = dodo("submit", JOB, *TINY, "train.steps=8", "train.save_every=2", "train.on_nonfinite=skip",
                "train.max_nonfinite_skips=2", f"runs_dir={tmp_path}/runs", cwd=tmp_path, check=False,
                env={"DODO_INJECT_NAN_AT_STEP": "3", "DODO_INJECT_NAN_STEPS": "5"})
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "at step 5, step 3 in a row (train.max_nonfinite_skips=2)" in proc.stdout
