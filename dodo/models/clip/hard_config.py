"""``model.clip.hard_samples``: the hard-sample domain adapter's keys (torch-free, read at submit).

A memory bank holds each training pair's difficulty, updated whenever the pair is trained on;
its weights scale the pair's loss and drive a sampler that draws hard pairs more often
(dodo/models/clip/hard_bank.py, dodo/data/hard_sampler.py, docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dodo.config.errors import check


@dataclass
class HardSamplesConfig:
    enabled: bool = False
    # loss: the pair's own InfoNCE term ((image->text + text->image) / 2); rank: how many
    # negatives outscore its positive (mean of both directions; 0 = retrieved first).
    difficulty: Literal["loss", "rank"] = "loss"
    # Bank update when a pair is seen again: d <- momentum * d + (1 - momentum) * new (first
    # sight: d <- new). 0 keeps only the latest value.
    momentum: float = 0.5
    # weight = clip(((d + eps) / (mean d over seen pairs + eps)) ** power, 1 / max_weight, max_weight);
    # a pair not seen yet weighs 1.
    power: float = 1.0
    max_weight: float = 5.0
    eps: float = 1.0e-3
    loss_weights: bool = True  # instance weights (normalised to mean 1 in the micro-batch) in the loss
    sampling: bool = True  # epochs >= 1 draw pairs with probability proportional to their weight
    # The weights of epoch e are frozen this many optimizer steps before it starts (at most one
    # epoch before), so the order does not depend on how far the data loader prefetches; it
    # must exceed data.num_workers x data.prefetch_factor (checked when the run starts).
    snapshot_lag: int = 32

    def __post_init__(self) -> None:
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.power >= 0, "power", f"must be >= 0, got {self.power}")
        check(self.max_weight >= 1, "max_weight", f"must be >= 1, got {self.max_weight}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.snapshot_lag >= 1, "snapshot_lag", f"must be >= 1, got {self.snapshot_lag}")
        check(not self.enabled or self.loss_weights or self.sampling, "loss_weights",
              "and sampling are both false: the bank would change nothing; enable one")

