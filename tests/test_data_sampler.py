"""The distributed sampler: every sample once per epoch across ranks, block locality, exact
mid-epoch resume on 2 ranks, and a 2 -> 1 rank resume that keeps the global order."""

from __future__ import annotations

import numpy as np
import pytest

from dodo.data.sampler import ORDER, GlobalBatchSampler, epoch_order

N, GB = 1000, 40  # 25 global batches per epoch


def rank_batches(world: int, start: int, stop: int, block: int = 64, window: int = 4,
                 num: int = N, seed: int = 3) -> list[list[list[int]]]:
    """Per step, the list of each rank's batch."""
    samplers = [GlobalBatchSampler(num, GB, r, world, seed=seed, start_step=start, max_steps=stop,
                                   block=block, window=window) for r in range(world)]
    return [list(step) for step in zip(*samplers)]


def flat(steps: list[list[list[int]]]) -> list[int]:
    return [i for step in steps for batch in step for i in batch]


@pytest.mark.parametrize("block,window", [(1, 1), (64, 4), (7, 3), (5000, 2)])
def test_epoch_order_is_a_permutation(block: int, window: int) -> None:
    for num in (1, 63, 1000):
        order = epoch_order(num, 11, 2, block, window)
        assert sorted(order.tolist()) == list(range(num))
    assert np.array_equal(epoch_order(N, 11, 2, block, window), epoch_order(N, 11, 2, block, window))
    assert not np.array_equal(epoch_order(N, 11, 2, 64, 4), epoch_order(N, 11, 3, 64, 4))
    assert not np.array_equal(epoch_order(N, 11, 2, 64, 4), epoch_order(N, 12, 2, 64, 4))


def test_every_sample_once_per_epoch_across_ranks() -> None:
    steps = rank_batches(world=4, start=0, stop=2 * (N // GB))
    per_epoch = N // GB
    for epoch in range(2):
        seen = flat(steps[epoch * per_epoch:(epoch + 1) * per_epoch])
        assert len(seen) == len(set(seen)) == N  # 1000 = 25 x 40: nothing dropped
        for step in steps[epoch * per_epoch:(epoch + 1) * per_epoch]:
            assert all(len(b) == GB // 4 for b in step)
            assert len({i for b in step for i in b}) == GB  # ranks never share a sample
    assert flat(steps[:per_epoch]) != flat(steps[per_epoch:])  # a new order each epoch


def test_partial_last_batch_is_dropped() -> None:
    steps = rank_batches(world=2, start=0, stop=1010 // GB, num=1010)
    seen = flat(steps)
    assert len(seen) == len(set(seen)) == 1000  # 10 samples wait for the next epoch


def test_batches_read_few_blocks() -> None:
    steps = rank_batches(world=2, start=0, stop=N // GB, block=64, window=4)
    for step in steps:
        blocks = {i // 64 for b in step for i in b}
        assert len(blocks) <= 2 * 4  # one window, or the seam of two
    uniform = rank_batches(world=2, start=0, stop=N // GB, block=1, window=1)
    assert np.mean([len({i // 64 for b in s for i in b}) for s in uniform]) > 10


def test_resume_mid_epoch_on_two_ranks_equals_straight() -> None:
    straight = rank_batches(world=2, start=0, stop=60)  # 2.4 epochs
    first = rank_batches(world=2, start=0, stop=37)
    state = GlobalBatchSampler(N, GB, 0, 2, seed=3, block=64, window=4).state_dict(37)
    assert (state["epoch"], state["consumed_in_epoch"], state["order"]) == (1, 12 * GB, ORDER)
    resumed_samplers = [GlobalBatchSampler(N, GB, r, 2, seed=3, start_step=state["step"], max_steps=60,
                                           block=64, window=4) for r in range(2)]
    for s in resumed_samplers:
        s.check_resumable(state)
    second = [list(step) for step in zip(*resumed_samplers)]
    assert first + second == straight
    epoch1 = flat(straight[25:50])
    assert sorted(epoch1) == list(range(N))  # the split epoch still sees each sample once


def test_resume_two_ranks_to_one_keeps_the_global_order() -> None:
    straight = rank_batches(world=2, start=0, stop=40)
    state = GlobalBatchSampler(N, GB, 1, 2, seed=3, block=64, window=4).state_dict(17)
    one = GlobalBatchSampler(N, GB, 0, 1, seed=3, start_step=17, max_steps=40, block=64, window=4)
    one.check_resumable(state)  # world size may change, global batch may not
    for step, batch in zip(range(17, 40), one):
        assert batch == straight[step][0] + straight[step][1]


@pytest.mark.parametrize("change,message", [
    (dict(seed=4), "data.seed"), (dict(global_batch=80), "global_batch"),
    (dict(num_samples=999), "num_samples"), (dict(block=32), "data.shuffle_block"),
    (dict(window=2), "data.shuffle_window"),
])
def test_resume_refuses_a_changed_order(change: dict, message: str) -> None:
    args = dict(num_samples=N, global_batch=GB, rank=0, world_size=2, seed=3, block=64, window=4)
    state = GlobalBatchSampler(**args).state_dict(10)
    with pytest.raises(ValueError, match=message):
        GlobalBatchSampler(**{**args, **change}).check_resumable(state)
    with pytest.raises(ValueError, match="sample order"):
        GlobalBatchSampler(**args).check_resumable({k: v for k, v in state.items() if k != "order"})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(N, 30, 0, 4, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(10, GB, 0, 2, seed=0)
    with pytest.raises(TypeError):
        len(GlobalBatchSampler(N, GB, 0, 2, seed=0))
