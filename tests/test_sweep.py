"""Sweep grids, the sweep folder, and `dodo table`, without a scheduler (the array itself runs
in tests/test_slurm.py on the real test cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, dodo
from dodo.cluster import sweep as sweeps
from dodo.config.errors import ConfigError
from dodo.rundir import write_json_atomic

DEMO = str(REPO / "jobs" / "demo.yaml")


def test_grid_is_the_product_in_order():
    grid = sweeps.parse_grid(["train.lr=1e-4,3e-4", "train.betas=[0.9, 0.99],[0.8, 0.9]"])
    assert grid[1] == ("train.betas", [[0.9, 0.99], [0.8, 0.9]])  # lists stay whole
    points = sweeps.expand(grid)
    assert [p.dir for p in points] == ["p0", "p1", "p2", "p3"]
    assert points[1].overrides == ("train.lr=1e-4", "train.betas=[0.8, 0.9]")
    assert points[3].label == "p3 lr=3e-4 betas=[0.8, 0.9]"


@pytest.mark.parametrize("specs, expected", [
    (["train.lr"], "malformed"),
    (["train.lr=1e-4,,3e-4"], "empty value"),
    (["cluster.nodes=1,2"], "cluster settings cannot vary"),
    (["train.lr=1,2", "train.lr=3"], "names train.lr twice"),
])
def test_bad_grids(specs, expected):
    with pytest.raises(ConfigError, match=expected):
        sweeps.parse_grid(specs)


def test_a_bad_point_writes_nothing(tmp_path: Path):
    with pytest.raises(ConfigError, match="sweep point p1 steps=-1: .*train.steps=-1: must be > 0"):
        sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["train.steps=5,-1"], None)
    assert not (tmp_path / "runs").exists()


def test_sweep_folder_status_and_table(tmp_path: Path):
    sweep, configs = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["train.lr=1e-3,3e-3", "train.seed=0,1"],
                                   None)
    assert [c.train.lr for c in configs] == [1e-3, 1e-3, 3e-3, 3e-3]
    assert sorted(p.name for p in sweep.path.iterdir()) == ["job", "p0", "p1", "p2", "p3", "sweep.json"]
    assert "lr: 0.003" in (sweep.path / "p2" / "config.yaml").read_text()
    for i, run in enumerate(sweep.runs()[:3]):  # three finished, one never ran
        run.update_status(state="completed", step=5, total_steps=5)
        write_json_atomic(run.summary_file, {"final": {"eval.loss": 1.0 + i, "eval.caption_accuracy": 0.5},
                                             "final_train_loss": 2.0 + i})
    header, rows = sweeps.table(sweep)
    assert header == ["point", "train.lr", "train.seed", "state", "step", "trainable params", "final train loss",
                      "eval.caption_accuracy", "eval.loss"]
    assert rows[2] == ["p2", "3e-3", "0", "completed", "5", "-", "4", "0.5", "3"]
    assert rows[3][3:7] == ["never started", "0", "-", "-"]  # created, never submitted
    out = dodo("table", str(sweep.path), cwd=tmp_path).stdout
    assert out.count("\n| p") == 4 and (sweep.path / "table.csv").read_text().count("\n") == 5
    status = dodo("status", f"--runs-dir={tmp_path}/runs", cwd=tmp_path).stdout
    assert f"sweep demo/{sweep.path.name}: 4 points over train.lr x train.seed" in status
    assert "  p1 lr=1e-3 seed=1" in status and "requeues" in status
    assert json.loads(sweep.file.read_text())["points"][3]["values"] == {"train.lr": "3e-3", "train.seed": 1}
