"""CLIP + adapters end to end: 2 CPU ranks train the tiny job, retrieval improves in and out of
distribution, and `dodo eval` reproduces the numbers from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import dodo, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SMALL = ["data.num_train=800", "data.num_eval=128", "eval.num_ood=96", "train.steps=60", "train.save_every=60",
         "train.eval_every=1000", "train.log_every=10", "eval.knn_bank=256"]


@pytest.mark.parametrize("job", ["clip_lora", "clip_r_adapter"])
def test_clip_job_improves_retrieval_and_eval_matches(job, workdir: Path):
    out = dodo("submit", f"jobs/{job}.yaml", *SMALL, f"runs_dir={workdir}/runs", cwd=workdir, timeout=600)
    assert out.returncode == 0, out.stdout
    (run,) = run_dirs(workdir / "runs", job)
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["initial"], summary["final"]
    assert last["eval.loss"] < first["eval.loss"]
    assert last["eval.id.r_mean"] > first["eval.id.r_mean"] + 0.2
    assert last["eval.ood.r_mean"] > first["eval.ood.r_mean"] + 0.1
    if job == "clip_lora":
        ev = dodo("eval", str(run), "--task", "retrieval", cwd=workdir)
        got = json.loads((run / "eval" / "retrieval.json").read_text())
        assert got["eval.id.r_mean"] == pytest.approx(last["eval.id.r_mean"], abs=1e-6), ev.stdout
        assert got["eval.ood.r_mean"] == pytest.approx(last["eval.ood.r_mean"], abs=1e-6)
        none = dodo("eval", str(run), "--task", "suites", cwd=workdir, check=False)
        assert none.returncode == 2 and "eval.suites is empty" in none.stderr, none.stderr
        # The WiSE curve itself is unit-tested (tests/test_eval_metrics.py, tests/test_adapters.py).


def test_eval_without_checkpoint_is_a_clear_error(workdir: Path):
    run = workdir / "runs" / "x" / "1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\nmodel: {family: clip}\n")
    out = dodo("eval", str(run), cwd=workdir, check=False)
    assert out.returncode == 2 and "no published checkpoint" in out.stderr, out.stderr
