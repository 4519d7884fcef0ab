"""The root of the config tree: one job."""

from __future__ import annotations

from dataclasses import dataclass, field

from dodo.cluster.config import ClusterConfig
from dodo.config.errors import check
from dodo.data.config import DataConfig
from dodo.distributed.config import DeepSpeedConfig
from dodo.models.config import ModelConfig
from dodo.train.config import TrainConfig


@dataclass
class JobConfig:
    name: str = "run"
    runs_dir: str = "runs"  # run directories go to <runs_dir>/<name>/<id>/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name",
              f"must be a non-empty name of letters, digits, '-', '_' or '.', got {self.name!r}")
