"""Training loop config: steps, batch, optimiser, schedule, checkpoints, evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dodo.config.errors import check


@dataclass
class TrainConfig:
    steps: int = 200
    micro_batch: int = 16  # per rank, per forward
    grad_accum: int = 1
    lr: float = 8.0e-4
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of lr
    warmup_steps: int = 20
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    keep_checkpoints: int = 2
    caption_samples: int = 12  # held-out images captioned greedily and scored at the end
    # Checkpoint and stop (resumable) after this many steps in one allocation; 0: run to the end.
    # For queues with short limits and chained jobs: each submission continues the run.
    steps_per_allocation: int = 0
    # Divergence guard (dodo/train/guard.py): a non-finite loss or gradient skips the update or
    # stops the run (state failed, exit 4); at most this many skipped steps in a row.
    on_nonfinite: Literal["skip", "stop"] = "stop"
    max_nonfinite_skips: int = 3
    # Where metrics go (dodo/train/trackers.py): jsonl (metrics.jsonl), tensorboard (tb/),
    # mlflow (a file store in the run directory, mlruns/), wandb (offline, in wandb/).
    trackers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])

    def __post_init__(self) -> None:
        check(self.steps > 0, "steps", f"must be > 0, got {self.steps}; set the number of optimizer steps")
        check(self.micro_batch > 0, "micro_batch", f"must be > 0, got {self.micro_batch}")
        check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        for name in ("log_every", "eval_every", "save_every", "eval_batches", "keep_checkpoints"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.steps_per_allocation >= 0, "steps_per_allocation",
              f"must be >= 0 (0 turns it off), got {self.steps_per_allocation}")
        check(0 <= self.max_nonfinite_skips <= 1_000_000, "max_nonfinite_skips",
              f"must be in [0, 1000000], got {self.max_nonfinite_skips}")
        known = ("jsonl", "tensorboard", "mlflow", "wandb")
        bad = [t for t in self.trackers if t not in known][:3]
        check(not bad and len(self.trackers) == len(set(self.trackers)), "trackers",
              f"must be distinct names from {', '.join(known)}, got {bad or self.trackers}")
        check("jsonl" in self.trackers, "trackers",
              "must include jsonl (metrics.jsonl feeds dodo status, the summary and resume); add it")
        import importlib.util  # the packages are imported only by rank 0, at start-up

        for name, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
            check(name not in self.trackers or importlib.util.find_spec(package) is not None, "trackers",
                  f"names {name}, but the {package} package is not installed here; "
                  f"pip install {'mlflow-skinny' if name == 'mlflow' else 'wandb'}, or remove {name}")
        check(self.caption_samples >= 0, "caption_samples", f"must be >= 0, got {self.caption_samples}")
