"""DeepSpeed settings that dodo turns into a DeepSpeed config dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dodo.config.errors import check

if TYPE_CHECKING:
    from dodo.config.schema import JobConfig


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    initial_scale_power: int = 16  # fp16 dynamic loss scaling starts at 2**this
    loss_scale_window: int = 1000

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.reduce_bucket_size > 0, "reduce_bucket_size", "must be > 0")
        check(self.allgather_bucket_size > 0, "allgather_bucket_size", "must be > 0")


# Here, not in engine.py: `dodo submit --dry-run` prints it without importing torch.
def deepspeed_config(cfg: JobConfig, world_size: int, precision: str,
                     load_universal: bool = False) -> dict[str, Any]:
    t, ds = cfg.train, cfg.deepspeed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": ds.contiguous_gradients,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
        },
        # dodo passes its own torch AdamW: DeepSpeed's fused/CPU Adam need compiled ops that
        # POWER9 and CPU-only hosts may lack, and ZeRO 1/2 shard any torch optimizer correctly.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # dodo logs progress itself
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": ds.initial_scale_power,
                          "loss_scale_window": ds.loss_scale_window, "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    if load_universal:  # resuming on another world size: dodo.train.checkpoint.prepare_universal
        config["checkpoint"] = {"load_universal": True}
    return config
