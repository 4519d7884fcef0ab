"""Provenance per allocation, over a real run stopped twice (train.steps_per_allocation) and
resumed twice by `dodo submit RUN`: three segments, one code snapshot, one MLflow run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TINY, dodo, run_dirs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
JOB = str(Path(__file__).parents[1] / "jobs/demo.yaml")


def test_segments_snapshot_and_tracking_across_two_requeues(tmp_path: Path):
    first = dodo("submit", JOB, *TINY, "train.steps=9", "train.save_every=3", "train.steps_per_allocation=3",
                 "train.trackers=[jsonl,mlflow]", f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert first.returncode == 3, first.stdout
    (run,) = run_dirs(tmp_path / "runs", "demo")
    code = json.loads((run / "job/code/code.json").read_text())
    assert (run / "job/code/dodo/train/loop.py").is_file() and (run / "job/code/dodo_kernels").is_dir()
    assert len(code["git_sha"]) == 40 and (run / "job/code/git.diff").exists()
    assert code["snapshot_ms"] < 5000
    snapshot = (run / "job/code/dodo/train/loop.py").stat().st_mtime
    assert dodo("submit", str(run), cwd=tmp_path).returncode == 3
    assert dodo("submit", str(run), cwd=tmp_path).returncode == 0
    assert (run / "job/code/dodo/train/loop.py").stat().st_mtime == snapshot  # taken once, at submit

    segments = [json.loads(line) for line in (run / "job/segments.jsonl").read_text().splitlines()]
    assert [(s["start_step"], s["end_step"]) for s in segments] == [(0, 3), (3, 6), (6, 9)]
    assert [s["how"].split(":")[0] for s in segments] == ["stopped", "stopped", "completed"]
    for s in segments:  # each allocation ran from the snapshot, and says on what
        assert s["dodo_source"] == str(run / "job/code" / "dodo")
        assert any(p.startswith("torch==") for p in s["packages"]) and s["nodes"] and s["world_size"] == 2
    status = dodo("status", str(run), cwd=tmp_path).stdout
    assert "segment 2:" in status and "steps 6->9, completed" in status

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (tracked,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert tracked.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(tracked.info.run_id, "train.loss")})
    assert steps == list(range(1, 10))  # all three allocations logged into the one MLflow run
