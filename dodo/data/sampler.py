"""A deterministic, resumable distributed batch sampler.

The global order is a pure function of (seed, epoch): each epoch is a permutation of the
dataset cut into global batches (the last partial batch is dropped). Rank r of W takes the
r-th contiguous slice of every global batch. Position is counted in optimizer steps, so a
checkpoint at step s resumes with exactly the samples not yet seen, and a different world
size with the same global batch sees the same global order.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields, per optimizer step, this rank's share of the global batch (a list of indices)."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int,
                 seed: int, start_step: int = 0, max_steps: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if num_samples < global_batch:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global batch "
                             f"({global_batch}); lower train.micro_batch or add data")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = global_batch // world_size
        self.batches_per_epoch = num_samples // global_batch
        self.start_step, self.max_steps = start_step, max_steps

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def global_batch_at(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.batches_per_epoch)
        return self._permutation(epoch)[b * self.global_batch:(b + 1) * self.global_batch].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step, epoch, perm = self.start_step, -1, None
        while self.max_steps is None or step < self.max_steps:
            e, b = divmod(step, self.batches_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            lo = b * self.global_batch + self.rank * self.per_rank
            yield perm[lo:lo + self.per_rank].tolist()
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an unbounded GlobalBatchSampler has no length")
        return max(0, self.max_steps - self.start_step)

    def state_dict(self, step: int) -> dict[str, Any]:
        """The sampler's position after `step` optimizer steps, for a checkpoint."""
        epoch, b = divmod(step, self.batches_per_epoch)
        return {"step": step, "epoch": epoch, "consumed_in_epoch": b * self.global_batch,
                "seed": self.seed, "global_batch": self.global_batch, "num_samples": self.num_samples}

    def check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a resume that would silently change the sample order."""
        for key in ("seed", "global_batch", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint was written with data order {key}={state[key]}, this run "
                                 f"has {getattr(self, key)}; keep {key} unchanged to resume")
