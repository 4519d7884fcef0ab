"""`dodo upcycle`, end to end: dense run -> upcycle -> MoE run (expert parallel) that starts
exactly where the dense run ended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, TINY, dodo, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_upcycled_run_starts_where_the_dense_run_ended(tmp_path: Path):
    dodo("submit", str(REPO / "jobs/demo.yaml"), *TINY, "train.steps=6", "train.save_every=6",
         f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    (dense,) = run_dirs(tmp_path / "runs", "demo")

    bad = dodo("upcycle", str(dense), "model.moe.ep_size=2", "--experts", "3", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "must divide model.moe.num_experts=3, got 2" in bad.stderr
    assert not (tmp_path / "runs" / "demo_upcycled").exists() or not run_dirs(tmp_path / "runs", "demo_upcycled")

    out = dodo("upcycle", str(dense), "model.moe.dropless=true", "model.moe.ep_size=2", "train.steps=2",
               "--experts", "4", "--top-k", "2", cwd=tmp_path)
    (moe,) = run_dirs(tmp_path / "runs", "demo_upcycled")
    assert f"dodo submit {moe}" in out.stdout
    assert (moe / "init/upcycled.pt").is_file()
    assert "upcycle_from: " + str(moe / "init/upcycled.pt") in (moe / "config.yaml").read_text()

    dodo("submit", str(moe), cwd=tmp_path)
    want = summary(dense)["final"]["eval.loss"]
    got = summary(moe)["initial"]["eval.loss"]
    assert got == pytest.approx(want, rel=1e-5)  # identical experts, gates summing to 1

    again = dodo("upcycle", str(moe), "--experts", "2", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "already an MoE run" in again.stderr
