"""The root of the config tree: one job."""

from __future__ import annotations

from dataclasses import dataclass, field

from dodo.cluster.config import ClusterConfig
from dodo.config.errors import check
from dodo.data.config import DataConfig
from dodo.distributed.config import DeepSpeedConfig
from dodo.eval.config import EvalConfig
from dodo.models.config import ModelConfig, default_model_config
from dodo.models.registry import family
from dodo.train.config import TrainConfig


@dataclass
class JobConfig:
    name: str = "run"
    runs_dir: str = "runs"  # run directories go to <runs_dir>/<name>/<id>/
    model: ModelConfig = field(default_factory=default_model_config)  # the subclass of model.family
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # retrieval, zero-shot, kNN, WiSE, OOD split

    def __post_init__(self) -> None:
        check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name",
              f"must be a non-empty name of letters, digits, '-', '_' or '.', got {self.name!r}")
        moe, world = self.model.moe, self.cluster.world_size
        if moe.ep_size == "auto":  # chosen from the model and the cluster profile (docs/scaling.md)
            from dodo.moe.planner import choose_for
            moe.plan = choose_for(self) if moe.enabled else None  # kept for `dodo submit --dry-run`
            moe.ep_size = moe.plan.ep_size if moe.plan else 1
        if moe.enabled:
            check(self.deepspeed.zero_stage != 3, "deepspeed.zero_stage",
                  f"is 3 with model.moe.num_experts={moe.num_experts}, but DeepSpeed does not support MoE "
                  "with ZeRO stage 3 (\"MoE not supported with Stage 3\"); set deepspeed.zero_stage to 1 "
                  "or 2, or model.moe.num_experts=0 for dense adapters")
            check(world % moe.ep_size == 0, "model.moe.ep_size",
                  f"must divide the world size {world}, got {moe.ep_size} "
                  f"(cluster.nodes={self.cluster.nodes} x cluster.tasks_per_node={self.cluster.tasks_per_node}); "
                  f"set model.moe.ep_size to one of "
                  f"{', '.join(str(d) for d in range(1, world + 1) if world % d == 0 and moe.num_experts % d == 0)}")
        check(self.train.precision in ("auto", "fp32") or self.cluster.gpus_per_task > 0, "train.precision",
              f"is {self.train.precision}, which needs a GPU, but cluster.gpus_per_task=0 (the ranks run on CPU); "
              "set cluster.gpus_per_task=1, or train.precision to auto (fp32 on CPU) or fp32")
        validate = family(self.model.family).validate
        if validate is not None:  # the family's cross-section checks (dodo/models/<family>/config.py)
            validate(self)
