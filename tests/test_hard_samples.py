"""The hard-sample domain adapter (model.clip.hard_samples): per-pair InfoNCE against
dodo.losses.info_nce, exact bank updates on a hand-computed batch, weighted draws reproducible
from (seed, epoch, bank state), the same remaining global order after a resume on 1 or 2 ranks,
and a 2-rank job on a Karpathy-format COCO cache that trains, improves retrieval and checkpoints
its bank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import dodo, metrics, run_dirs
from dodo.data.hard_sampler import HardBatchSampler, weighted_order
from dodo.data.sampler import GlobalBatchSampler
from dodo.losses import info_nce
from dodo.models.clip.hard_bank import DifficultyBank, per_pair_info_nce
from dodo.models.clip.config import HardSamplesConfig


def _unit(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("ids", [None, [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 2]])
def test_per_pair_info_nce_averages_to_info_nce(ids) -> None:
    img, txt = _unit(6, 8, 0), _unit(6, 8, 1)
    pos = None if ids is None else torch.tensor(ids)
    loss, rank = per_pair_info_nce(img, txt, 10.0, pos)
    assert loss.shape == rank.shape == (6,)
    torch.testing.assert_close(loss.mean(), info_nce(img, txt, 10.0, positive_ids=pos), rtol=1e-12, atol=1e-12)


def test_rank_difficulty_by_hand() -> None:
    # 3 pairs; logits = image @ text.T. Pair 0 is retrieved first both ways; pair 2's positive
    # is beaten by one negative in its row (text 1) and one in its column (image 1).
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    _, rank = per_pair_info_nce(img, txt, 1.0)
    # logits rows: [1, .6, .8], [0, .8, .6], [.6, .68+.32=1.0, .48+.48=.96]
    # pair 1: row 1 own .8, none higher; column 1 own .8: image 0 .6, image 2 1.0 -> 1 higher
    # pair 2: row 2 own .96, text 1 (1.0) higher; column 2 own .96: image 0 .8, image 1 .6 -> 0
    assert rank.tolist() == [0.0, 0.5, 0.5]


def test_bank_update_and_weights_are_exact_for_a_hand_computed_batch() -> None:
    cfg = HardSamplesConfig(enabled=True, momentum=0.5, power=1.0, max_weight=3.0, eps=1e-3)
    bank = DifficultyBank(5, cfg, batches_per_epoch=2)
    bank.update(torch.tensor([0, 1, 3]), torch.tensor([2.0, 1.0, 0.5]))
    assert bank.d.tolist() == [2.0, 1.0, 0.0, 0.5, 0.0] and bank.seen.tolist() == [True, True, False, True, False]
    # pair 0 twice in one gathered batch: updated in order, 0.5 * 2 + 0.5 * 4 = 3, then 0.5 * 3 + 0.5 * 1 = 2
    bank.update(torch.tensor([0, 2, 0]), torch.tensor([4.0, 3.0, 1.0]))
    assert bank.d.tolist() == [2.0, 1.0, 3.0, 0.5, 0.0]
    mean = (2.0 + 1.0 + 3.0 + 0.5) / 4
    want = [min(3.0, max(1 / 3, (d + 1e-3) / (mean + 1e-3))) for d in (2.0, 1.0, 3.0, 0.5)] + [1.0]
    torch.testing.assert_close(bank.weights(), torch.tensor(want, dtype=torch.float64))


def test_weighted_loss_uses_the_bank_before_updating_it() -> None:
    cfg = HardSamplesConfig(enabled=True, momentum=0.0)
    bank = DifficultyBank(4, cfg, batches_per_epoch=10)
    bank.update(torch.tensor([0, 1]), torch.tensor([3.0, 1.0]))
    img, txt = _unit(2, 4, 2), _unit(2, 4, 3)
    w = bank.weights(torch.tensor([0, 1]))
    loss, _ = per_pair_info_nce(img, txt, 5.0)
    got = bank.weighted_loss(img, txt, 5.0, None, torch.tensor([0, 1]))
    torch.testing.assert_close(got, (w * loss).sum() / w.sum())
    torch.testing.assert_close(bank.d[:2], loss.detach())  # momentum 0: the latest value


def test_weighted_draws_reproduce_from_seed_epoch_and_weights() -> None:
    w = np.ones(50)
    w[:5] = 10.0  # 5 hard pairs
    a, b = weighted_order(50, 7, 3, w), weighted_order(50, 7, 3, w.copy())
    assert np.array_equal(a, b)
    assert not np.array_equal(a, weighted_order(50, 7, 4, w))
    assert not np.array_equal(a, weighted_order(50, 8, 3, w))
    many = np.concatenate([weighted_order(50, 7, e, w) for e in range(1, 41)])
    share = np.isin(many, np.arange(5)).mean()
    assert abs(share - 50 / 95) < 0.05  # P(hard) = 5 * 10 / (5 * 10 + 45)


def _train_step(bank: DifficultyBank, step: int) -> None:
    """What one optimizer step does to the bank: 8 pairs (drawn from the step number) get their
    fixed difficulty k % 7 / 2, then the bank freezes any epoch weights now due."""
    index = torch.from_numpy(np.random.default_rng(step).integers(0, bank.n, 8))
    bank.update(index, torch.from_numpy(index.numpy() % 7 / 2.0))
    bank.forwards += 1
    bank._freeze_due(bank.forwards)


def _bank_after(steps: int, n: int, cfg: HardSamplesConfig, bpe: int) -> DifficultyBank:
    bank = DifficultyBank(n, cfg, bpe)
    for step in range(steps):
        _train_step(bank, step)
    return bank


def _drive(bank: DifficultyBank, n: int, gb: int, seed: int, world: int, start: int, total: int) -> list[list[int]]:
    """The loop on ``world`` ranks from ``start``: draw each rank's share, train, repeat;
    returns the global batches (rank slices concatenated in rank order)."""
    its = [iter(HardBatchSampler(n, gb, r, world, seed, bank.epoch_weights, start_step=start, max_steps=total))
           for r in range(world)]
    out = []
    for step in range(start, total):
        out.append(sum((next(it) for it in its), []))
        _train_step(bank, step)
    return out


def test_resume_on_one_or_two_ranks_gives_the_same_remaining_order() -> None:
    n, gb, seed, total, k = 40, 8, 3, 22, 9  # 5 batches per epoch: epochs 0..4
    cfg = HardSamplesConfig(enabled=True, snapshot_lag=2)
    straight_bank = DifficultyBank(n, cfg, n // gb)
    straight = _drive(straight_bank, n, gb, seed, 1, 0, total)
    assert straight[k:][0] != straight[-1]
    state = _bank_after(k, n, cfg, n // gb).state_dict()  # the checkpoint at step k
    for world in (1, 2):
        resumed = DifficultyBank(n, cfg, n // gb)
        resumed.load_state_dict(state)
        assert _drive(resumed, n, gb, seed, world, k, total) == straight[k:], world
    # The weighted epochs really are weighted: pairs with k % 7 == 6 are the hardest.
    drawn = np.concatenate([np.array(b) for b in straight[10:]])
    assert np.isin(drawn % 7, [5, 6]).mean() > 2 / 7 + 0.05


def test_epoch_zero_is_the_plain_order_and_resume_refuses_another_order() -> None:
    hard = HardBatchSampler(32, 8, 0, 1, 5, lambda e: None, block=4, window=2)
    plain = GlobalBatchSampler(32, 8, 0, 1, 5, block=4, window=2)
    assert [hard.global_batch_at(s) for s in range(4)] == [plain.global_batch_at(s) for s in range(4)]
    with pytest.raises(RuntimeError, match="snapshot_lag"):
        hard.global_batch_at(4)  # epoch 1's weights not frozen
    with pytest.raises(ValueError, match="hard_samples"):
        hard.check_resumable(plain.state_dict(2))
    hard.check_resumable(hard.state_dict(2))


def test_bank_freezes_epoch_weights_lag_steps_early_and_round_trips() -> None:
    cfg = HardSamplesConfig(enabled=True, snapshot_lag=2)
    bank = _bank_after(1, 16, cfg, 4)
    assert bank.epoch_weights(1) is None  # frozen when 4 - 2 = 2 steps are done
    bank = _bank_after(2, 16, cfg, 4)
    assert bank.epoch_weights(1) is not None and bank.epoch_weights(2) is None
    w1 = bank.epoch_weights(1).copy()
    bank.update(torch.tensor([0]), torch.tensor([100.0]))
    assert np.array_equal(bank.epoch_weights(1), w1)  # frozen: later updates do not move it
    other = DifficultyBank(16, cfg, 4)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.d, bank.d) and np.array_equal(other.epoch_weights(1), w1)
    with pytest.raises(ValueError, match="same data"):
        DifficultyBank(17, cfg, 4).load_state_dict(bank.state_dict())


def _gather_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    bank = DifficultyBank(8, HardSamplesConfig(enabled=True, momentum=0.5), batches_per_epoch=4)
    img, txt = _unit(3, 4, 10 + rank), _unit(3, 4, 20 + rank)
    index = torch.tensor([[0, 1, 2], [2, 5, 6]][rank])  # pair 2 on both ranks: rank 0's value first
    bank.weighted_loss(img, txt, 5.0, None, index)
    torch.save({"bank": bank.state_dict(), "loss": per_pair_info_nce(img, txt, 5.0)[0]}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_bank_updates_are_gathered_so_every_rank_holds_the_same_bank(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_gather_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(r0["bank"]["d"], r1["bank"]["d"]) and torch.equal(r0["bank"]["seen"], r1["bank"]["seen"])
    l0, l1 = r0["loss"].double(), r1["loss"].double()
    want = torch.zeros(8, dtype=torch.float64)
    want[[0, 1]] = l0[:2]
    want[2] = 0.5 * l0[2] + 0.5 * l1[0]  # first sight from rank 0, then rank 1's update
    want[[5, 6]] = l1[1:]
    torch.testing.assert_close(r0["bank"]["d"], want)
    assert r0["bank"]["seen"].tolist() == [True, True, True, False, False, True, True, False]


# ---------------------------------------------------------------- the tiny job, end to end

@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, Path]:
    from data_helpers import make_cache, write_karpathy, write_word_tokenizer

    root = tmp_path_factory.mktemp("hard")
    js, imgs = write_karpathy(root / "src", 80, 5, "coco", size=32)
    return {"tokenizer": write_word_tokenizer(root / "tokenizer.json"),
            "train": make_cache(js, "karpathy", root / "coco_train", images=str(imgs), split="train,restval")}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hard_sample_job_trains_on_two_ranks_and_checkpoints_its_bank(workdir: Path, coco) -> None:
    # Two allocations: stop after 20 steps (checkpoint), resume to 40 (the bank comes back).
    dodo("submit", "jobs/clip_hard_samples.yaml", f"data.train_cache={coco['train']}",
         f"data.eval_cache={coco['train']}", f"model.tokenizer={coco['tokenizer']}",
         "train.steps_per_allocation=20", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "clip_hard_samples")
    assert not (run / "summary.json").exists()
    dodo("submit", str(run), cwd=workdir, timeout=600)
    summary = json.loads((run / "summary.json").read_text())
    rows = metrics(run)
    train = [r["train.loss"] for r in rows if "train.loss" in r]
    assert train[-1] < train[0], train
    first = next(r for r in rows if "eval.id.r_mean" in r)["eval.id.r_mean"]
    final = summary["final"]["eval.id.r_mean"] if "final" in summary else summary["eval.id.r_mean"]
    assert final > first, (first, final)
    ckpt = torch.load(run / "checkpoints" / "step_00000040" / "mp_rank_00_model_states.pt", weights_only=False)
    bank = ckpt["task"]["hard_bank"]
    # forwards counts every training forward since step 0: 40 only if the resume restored the bank
    assert bank["seen"].float().mean() >= 224 / 240 and bank["forwards"] == 40  # epoch 0: 7 x 32 pairs and math.isfinite(float(bank["d"].sum()))
    assert set(bank["frozen"]) <= {5, 6}  # epochs still ahead at step 40 (7 steps per epoch)
