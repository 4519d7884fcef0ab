"""VLMo end to end: 2 CPU ranks train the tiny retrieval job (ITC + ITM with hard negatives);
ITC retrieval and ITM re-ranked retrieval improve in and out of distribution, and `dodo eval`
reproduces the numbers from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import dodo, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SMALL = ["data.num_train=800", "data.num_eval=128", "eval.num_ood=96", "train.steps=60", "train.save_every=60",
         "train.eval_every=1000", "train.log_every=10", "eval.knn_bank=256", "model.vlmo.rerank_k=4"]


def test_vlmo_job_improves_retrieval_and_eval_matches(workdir: Path):
    out = dodo("submit", "jobs/vlmo_retrieval.yaml", *SMALL, f"runs_dir={workdir}/runs", cwd=workdir, timeout=600)
    assert out.returncode == 0, out.stdout
    (run,) = run_dirs(workdir / "runs", "vlmo_retrieval")
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["initial"], summary["final"]
    assert last["eval.loss"] < first["eval.loss"]
    for split in ("id", "ood"):
        assert last[f"eval.{split}.r_mean"] > first[f"eval.{split}.r_mean"] + 0.2, (split, first, last)
        assert last[f"eval.{split}.itm_r_mean"] > first[f"eval.{split}.itm_r_mean"] + 0.2, (split, first, last)
    ev = dodo("eval", str(run), "--task", "retrieval", cwd=workdir)
    got = json.loads((run / "eval" / "retrieval.json").read_text())
    for key in ("eval.id.r_mean", "eval.ood.r_mean", "eval.id.itm_r_mean"):
        assert got[key] == pytest.approx(last[key], abs=1e-6), (key, ev.stdout)
