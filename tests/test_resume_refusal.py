"""A refused resume leaves the run exactly as it was; overrides live in job/overrides/<n>.yaml
until the ranks accept them (dodo/config/resume.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, dodo, run_dirs


def _snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.yaml", "status.json")}


def test_rank_side_refusal_is_recorded_and_config_untouched(tmp_path: Path):
    from dodo.config.loader import dump_config, load_job
    from dodo.config.resume import (accept_overrides, load_run_config, pending_overrides, record_overrides,
                                    refuse_overrides)
    from dodo.rundir import RunDir

    run = RunDir.create(tmp_path, "r", dump_config(load_job(REPO / "jobs/demo.yaml")))
    before = run.config.read_bytes()
    record_overrides(run, ["train.grad_accum=2", "cluster.tasks_per_node=1"], ["..."])
    assert load_run_config(run).cluster.tasks_per_node == 1 and run.config.read_bytes() == before
    refuse_overrides(run, "checkpoint written by 2 ranks")
    assert run.config.read_bytes() == before and pending_overrides(run) == (None, [])
    assert yaml.safe_load((run.job / "overrides/1.yaml").read_text())["state"] == "refused"
    assert "refused" in run.status() and load_run_config(run).cluster.tasks_per_node == 2
    record_overrides(run, ["train.grad_accum=2", "cluster.tasks_per_node=1"], ["..."])
    accept_overrides(run)
    assert load_job(run.config).cluster.tasks_per_node == 1
    assert yaml.safe_load((run.job / "overrides/2.yaml").read_text())["state"] == "applied"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_refused_moe_resume_then_plain_resume(tmp_path: Path):
    job = str(REPO / "jobs/moe_demo.yaml")
    dodo("submit", job, *TINY, "train.steps=2", "train.save_every=2", f"runs_dir={tmp_path}", cwd=tmp_path)
    (run,) = run_dirs(tmp_path, "moe_demo")
    before = _snapshot(run)
    # 4 ranks would change the global batch: refused at submit, before anything is written.
    proc = dodo("submit", str(run), "cluster.tasks_per_node=4", cwd=tmp_path, check=False, timeout=60)
    assert proc.returncode == 2 and "global batch" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert _snapshot(run) == before and not (run / "job/overrides").exists()
    again = dodo("submit", str(run), cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and (run / "config.yaml").read_bytes() == before["config.yaml"]
