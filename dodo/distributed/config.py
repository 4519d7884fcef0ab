"""DeepSpeed settings that dodo turns into a DeepSpeed config dict."""

from __future__ import annotations

from dataclasses import dataclass

from dodo.config.errors import check


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
