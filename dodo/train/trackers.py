"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow (file store), W&B (offline).

Each tracker is embedded and writes inside the run directory, so nothing has to be started and
compute nodes need no network. A requeued or restarted run continues the SAME tracking run: its
id is kept in job/trackers.json (MLflow run id, W&B run id) and reopened by the next allocation
(otherwise each process starts a new run: Lightning #13524).

Rows past the resumed checkpoint's step: metrics.jsonl and TensorBoard drop them (purge_step);
MLflow's history is append-only, so a value of the interrupted allocation may appear twice for
one step there (the later one is the one the run continued from).
"""

from __future__ import annotations

import os
import time
from typing import Any

from dodo.rundir import RunDir, read_json, write_json_atomic


def tracker_ids(run: RunDir) -> dict[str, str]:
    return read_json(run.job / "trackers.json", default={})


def _save_id(run: RunDir, name: str, run_id: str) -> None:
    write_json_atomic(run.job / "trackers.json", {**tracker_ids(run), name: run_id})


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, run: RunDir, name: str, resume_step: int, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # heavy import, rank 0 only

        self.tb = SummaryWriter(str(run.tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, values: dict[str, Any]) -> None:
        for key, value in _scalars(values).items():
            self.tb.add_scalar(key.replace(".", "/"), value, step)

    def close(self, state: str) -> None:
        self.tb.close()


class MlflowTracker:
    """An MLflow run in the file store <run>/mlruns (file:// URI): no server, no database."""

    STATES = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, run: RunDir, name: str, resume_step: int, params: dict[str, Any]):
        # MLflow 3 keeps the file store in maintenance mode behind this opt-in; the run directory
        # must stay self-contained (no sqlite / SQLAlchemy on compute nodes), so opt in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(run.path / "mlruns").as_uri())
        self.run_id = tracker_ids(run).get("mlflow")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")  # the same run, continued
        else:
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            created = self.client.create_run(exp_id, run_name=f"{run.path.parent.name}/{run.path.name}",
                                             tags={"dodo.run_dir": str(run.path)})
            self.run_id = created.info.run_id
            _save_id(run, "mlflow", self.run_id)
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def write(self, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _scalars(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATES.get(state, "KILLED"))


class WandbTracker:
    """A W&B run in offline mode under <run>/wandb; `wandb sync` uploads it later if wanted."""

    def __init__(self, run: RunDir, name: str, resume_step: int, params: dict[str, Any]):
        import wandb

        run_id = tracker_ids(run).get("wandb") or wandb.util.generate_id()
        _save_id(run, "wandb", run_id)
        self.wb = wandb.init(project=name, id=run_id, resume="allow", mode="offline", dir=str(run.path),
                             config=params)

    def write(self, step: int, values: dict[str, Any]) -> None:
        self.wb.log(_scalars(values), step=step)

    def close(self, state: str) -> None:
        self.wb.finish(exit_code=0 if state == "completed" else 1)


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def open_trackers(names: list[str], run: RunDir, name: str, resume_step: int,
                  params: dict[str, Any]) -> list[Any]:
    """The trackers named in train.trackers, jsonl excepted (MetricsWriter writes it itself)."""
    return [TRACKERS[n](run, name, resume_step, params) for n in names if n in TRACKERS]
