"""Experiment trackers with the real mlflow package's file store: a run reopened by a later
allocation continues the SAME MLflow run (its id kept in job/trackers.json)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dodo.rundir import RunDir
from dodo.train.metrics import MetricsWriter, read_metrics

pytest.importorskip("mlflow")


def client(run: RunDir):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run.path / "mlruns").as_uri())


def test_mlflow_run_continues_across_allocations(tmp_path: Path):
    run = RunDir.create(tmp_path / "runs", "demo", "name: demo\n")
    first = MetricsWriter(run, 0, ["jsonl", "mlflow"], "demo", {"lr": 0.1})
    for step in (1, 2, 3):
        first.write(step, **{"train.loss": 1.0 / step, "train.note": "text is not a metric"})
    first.close("stopped")
    run_id = (run.job / "trackers.json").read_text()
    c = client(run)
    (only,) = c.search_runs([c.get_experiment_by_name("demo").experiment_id])
    assert only.info.status == "KILLED" and only.data.params["lr"] == "0.1"

    second = MetricsWriter(run, 2, ["jsonl", "mlflow"], "demo", {"lr": 0.1})  # resumed from step 2
    for step in (3, 4):
        second.write(step, **{"train.loss": 0.5 / step})
    second.close("completed")
    assert (run.job / "trackers.json").read_text() == run_id
    runs = c.search_runs([c.get_experiment_by_name("demo").experiment_id])
    assert [r.info.run_id for r in runs] == [only.info.run_id] and runs[0].info.status == "FINISHED"
    history = c.get_metric_history(only.info.run_id, "train.loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.3333), (3, 0.1667),
                                                                (4, 0.125)]
    # metrics.jsonl dropped the interrupted step 3 on resume: one row per step there.
    assert [r["step"] for r in read_metrics(run.metrics)] == [1, 2, 3, 4]


def test_unknown_or_missing_tracker_is_refused_at_submit():
    from dodo.config.errors import ConfigValueError
    from dodo.train.config import TrainConfig

    with pytest.raises(ConfigValueError, match="neptune"):
        TrainConfig(trackers=["jsonl", "neptune"])
    with pytest.raises(ConfigValueError, match="must include jsonl"):
        TrainConfig(trackers=["mlflow"])
    TrainConfig(trackers=["jsonl", "mlflow"])
