"""A deterministic, resumable, shard-block-aware distributed batch sampler.

The global order of an epoch is a pure function of ``(seed, epoch, num_samples, block,
window)``, never of the world size:

1. cut the indices ``0 .. N-1`` into blocks of ``block`` consecutive samples (a block lies in
   one or two shards of the cache, which stores samples in index order);
2. shuffle the order of the blocks;
3. walk the shuffled blocks in windows of ``window`` blocks and shuffle the samples inside
   each window.

So every global batch draws from about ``window`` blocks: reads stay within a few shard
regions (HDF5 chunk / page cache hits, few zarr shard files), while the model still sees a
random order. ``block=1`` is a plain uniform permutation.

The epoch is cut into global batches (the last partial batch is dropped) and rank ``r`` of
``W`` takes the ``r``-th contiguous slice of each. The position is counted in optimizer
steps: ``state_dict(step)`` gives (epoch, samples consumed globally in the epoch), a resume
at ``step`` continues with exactly the samples not yet seen, and a resume with another world
size but the same global batch continues the same global order.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

ORDER = "block-window-v1"  # bump when the order function changes: old checkpoints refuse


def epoch_order(num_samples: int, seed: int, epoch: int, block: int = 1, window: int = 1) -> np.ndarray:
    """The global order of one epoch: a permutation of ``range(num_samples)``, int64."""
    rng = np.random.default_rng([seed, epoch, 0x5A3])
    if block <= 1:
        return rng.permutation(num_samples)
    n_blocks = -(-num_samples // block)
    blocks = rng.permutation(n_blocks)
    starts = blocks * block
    # (n_blocks, block) indices in shuffled block order; the last block may be short.
    grid = starts[:, None] + np.arange(block)[None, :]
    order = grid[grid < num_samples]
    # Window edges fall on block edges (the one short block may sit anywhere in the order).
    lengths = np.minimum(block, num_samples - starts)
    edges = np.concatenate([[0], np.cumsum(lengths)])[::window].tolist() + [num_samples]
    out = np.empty_like(order)
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[lo:hi] = rng.permutation(order[lo:hi])
    return out


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields, per optimizer step, this rank's share of the global batch (a list of indices)."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int,
                 seed: int, start_step: int = 0, max_steps: int | None = None,
                 block: int = 1, window: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if num_samples < global_batch:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global batch "
                             f"({global_batch}); lower train.micro_batch or add data")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if block < 1 or window < 1:
            raise ValueError(f"shuffle block={block} and window={window} must be >= 1")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.block, self.window = block, window
        self.per_rank = global_batch // world_size
        self.batches_per_epoch = num_samples // global_batch
        self.start_step, self.max_steps = start_step, max_steps
        self._cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.num_samples, self.seed, epoch, self.block, self.window))
        return self._cache[1]

    def global_batch_at(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.batches_per_epoch)
        return self.order(epoch)[b * self.global_batch:(b + 1) * self.global_batch].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            epoch, b = divmod(step, self.batches_per_epoch)
            lo = b * self.global_batch + self.rank * self.per_rank
            yield self.order(epoch)[lo:lo + self.per_rank].tolist()
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an unbounded GlobalBatchSampler has no length")
        return max(0, self.max_steps - self.start_step)

    def state_dict(self, step: int) -> dict[str, Any]:
        """The sampler's position after ``step`` optimizer steps, for a checkpoint."""
        epoch, b = divmod(step, self.batches_per_epoch)
        return {"step": step, "epoch": epoch, "consumed_in_epoch": b * self.global_batch,
                "seed": self.seed, "global_batch": self.global_batch, "num_samples": self.num_samples,
                "block": self.block, "window": self.window, "order": ORDER,
                "world_size": self.world_size}

    def check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a resume that would silently change the sample order.

        The world size may change; the global batch may not (a resumed run with another world
        size keeps it by changing train.micro_batch or train.grad_accum).
        """
        if state.get("order") != ORDER:
            raise ValueError(f"checkpoint was written with sample order {state.get('order', 'torch-randperm')!r}, "
                             f"this dodo uses {ORDER!r}; resume it with the dodo version that wrote it")
        for key, fix in (("seed", "data.seed"), ("global_batch", "train.micro_batch x train.grad_accum x ranks"),
                         ("num_samples", "the dataset"), ("block", "data.shuffle_block"),
                         ("window", "data.shuffle_window")):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint was written with data order {key}={state[key]}, this run "
                                 f"has {getattr(self, key)}; keep {fix} unchanged to resume")
        epoch, b = divmod(state["step"], self.batches_per_epoch)
        if (epoch, b * self.global_batch) != (state["epoch"], state["consumed_in_epoch"]):
            raise ValueError(f"checkpoint sampler position (epoch {state['epoch']}, "
                             f"{state['consumed_in_epoch']} samples) does not match step {state['step']}")
