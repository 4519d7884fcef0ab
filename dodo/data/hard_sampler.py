"""The hard-sample sampler: epochs after the first draw pairs in proportion to their difficulty.

Epoch 0 is the plain sampler's order (``dodo.data.sampler.epoch_order``: every pair once, so the
difficulty bank sees every pair). Epoch ``e >= 1`` draws ``num_samples`` indices *with
replacement* (as torch's ``WeightedRandomSampler`` does), probability proportional to the
bank's weights frozen for that epoch (``DifficultyBank.epoch_weights``; the bank freezes them
``snapshot_lag`` optimizer steps before the epoch starts, see dodo/models/clip/hard_bank.py):

    order(e) = default_rng([seed, e, 0x4A7D]).choice(N, size=N, replace=True, p=w_e / sum(w_e))

So the global order is a pure function of ``(seed, epoch, frozen weights)``, never of the world
size, and ``GlobalBatchSampler``'s slicing (rank r takes the r-th slice of each global batch)
and position counting (optimizer steps) apply unchanged: a resume at step k, on any world size,
continues with the same global batches, given the bank state the checkpoint restores. The
weighted epochs give up the block-window locality of the plain order (draws are spread over the
whole cache): the price of sampling by difficulty.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from dodo.data.sampler import ORDER, GlobalBatchSampler, epoch_order

HARD_ORDER = "hard-weighted-v1"  # bump when the weighted draw changes: old checkpoints refuse


def weighted_order(num_samples: int, seed: int, epoch: int, weights: np.ndarray) -> np.ndarray:
    """``num_samples`` indices drawn with replacement, P(i) proportional to ``weights[i]`` (N,)."""
    w = np.asarray(weights, np.float64)
    if w.shape != (num_samples,) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError(f"sampling weights must be {num_samples} finite values >= 0 with a positive sum")
    rng = np.random.default_rng([seed, epoch, 0x4A7D])
    return rng.choice(num_samples, size=num_samples, replace=True, p=w / w.sum())


class HardBatchSampler(GlobalBatchSampler):
    """``GlobalBatchSampler`` whose epochs >= 1 are weighted draws.

    ``epoch_weights(epoch)`` returns the (N,) weights frozen for that epoch, or None when the
    bank has not frozen them yet (the loader ran further ahead than the snapshot lag allows:
    an error naming the fix)."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                 epoch_weights: Callable[[int], Optional[np.ndarray]], start_step: int = 0,
                 max_steps: int | None = None, block: int = 1, window: int = 1):
        super().__init__(num_samples, global_batch, rank, world_size, seed, start_step, max_steps, block, window)
        self.epoch_weights = epoch_weights

    def order(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            if epoch == 0:
                order = epoch_order(self.num_samples, self.seed, 0, self.block, self.window)
            else:
                w = self.epoch_weights(epoch)
                if w is None:
                    raise RuntimeError(
                        f"the hard-sample weights of epoch {epoch} are not frozen yet: the data loader runs "
                        "further ahead than model.clip.hard_samples.snapshot_lag steps; raise it above "
                        "data.num_workers x data.prefetch_factor")
                order = weighted_order(self.num_samples, self.seed, epoch, w)
            self._cache = (epoch, order)
        return self._cache[1]

    def state_dict(self, step: int) -> dict[str, Any]:
        return {**super().state_dict(step), "order": HARD_ORDER}

    def check_resumable(self, state: dict[str, Any]) -> None:
        if state.get("order") != HARD_ORDER:
            raise ValueError(f"checkpoint was written with sample order {state.get('order')!r}, this run draws "
                             f"hard samples ({HARD_ORDER!r}); keep model.clip.hard_samples.enabled as it was "
                             "to resume")
        super().check_resumable({**state, "order": ORDER})
