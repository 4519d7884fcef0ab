"""Where a job runs. The scheduler issue adds Slurm/LSF profiles from hpc/clusters/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dodo.config.errors import check


@dataclass
class ClusterConfig:
    backend: Literal["auto", "local", "slurm", "lsf"] = "auto"
    nodes: int = 1
    tasks_per_node: int = 2  # ranks per node (one per GPU on a cluster, per process locally)
    threads_per_task: int = 1  # OMP/torch threads per rank
    time_limit_min: int = 60
    max_requeues: int = 10

    def __post_init__(self) -> None:
        check(self.nodes > 0, "nodes", f"must be > 0, got {self.nodes}")
        check(self.tasks_per_node > 0, "tasks_per_node", f"must be > 0, got {self.tasks_per_node}")
        check(self.threads_per_task > 0, "threads_per_task", f"must be > 0, got {self.threads_per_task}")
        check(self.time_limit_min > 0, "time_limit_min", f"must be > 0, got {self.time_limit_min}")
        check(self.max_requeues >= 0, "max_requeues", f"must be >= 0, got {self.max_requeues}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node
