"""The hard-sample domain adapter on CLIP (``model.clip.hard_samples.enabled``): the contrastive
task, plus a difficulty bank (hard_bank.py) that weights each pair's loss and a sampler that
draws hard pairs more often (dodo/data/hard_sampler.py). docs/methods.md has the method.

The training batches carry each pair's dataset index (``sample_index`` (B,)), so the model's
forward can look its pair up in the bank and update it; evaluation batches carry none and leave
the bank alone. The bank is this task's checkpoint state (``state_dict`` / ``load_state_dict``,
saved by the training loop with the sampler's position).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dodo.config.schema import JobConfig
from dodo.data.collate import CaptionCollator
from dodo.data.hard_sampler import HardBatchSampler
from dodo.data.sample import Sample
from dodo.data.sampler import GlobalBatchSampler
from dodo.models.clip.hard_bank import DifficultyBank
from dodo.models.registry import InitState
from dodo.tasks.contrastive import ContrastiveTask


@dataclass
class IndexedSample(Sample):
    index: int = -1  # the sample's index in the training set (the bank's row)


class IndexedDataset(Dataset):
    """A training set whose samples know their index; everything else is the wrapped set's."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> IndexedSample:
        s = self.base[i]
        return IndexedSample(**{f.name: getattr(s, f.name) for f in fields(Sample)}, index=int(i))

    def __getattr__(self, name: str) -> Any:  # manifest, image_ids(), labels() ... of the cache
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class IndexCollator(CaptionCollator):
    """CaptionCollator that adds ``sample_index`` (B,) long for samples that carry one."""

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        out = super().__call__(samples)
        index = [getattr(s, "index", -1) for s in samples]
        if min(index) >= 0:
            out["sample_index"] = torch.tensor(index, dtype=torch.long)  # (B,)
        return out


class HardSampleTask(ContrastiveTask):
    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        super().__init__(cfg, init)
        h, t = cfg.model.clip.hard_samples, cfg.train
        c = self.collate
        self.collate = IndexCollator(c.tokenizer, c.max_tokens, c.image_mean, c.image_std)
        self.train_set = IndexedDataset(self.train_set)
        self.world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world = torch.distributed.get_world_size()
        global_batch = t.micro_batch * t.grad_accum * self.world
        self.bank = DifficultyBank(len(self.train_set), h, max(1, len(self.train_set) // global_batch),
                                   t.grad_accum)
        self.model.hard_bank = self.bank  # read by ClipDualEncoder.forward (a plain attribute: no state_dict)
        d = cfg.data
        ahead = d.num_workers * max(d.prefetch_factor, 2) + 1  # batches the loader may request early
        if h.sampling and h.snapshot_lag < ahead:
            raise ValueError(f"model.clip.hard_samples.snapshot_lag={h.snapshot_lag}, but the data loader may run "
                             f"{ahead} steps ahead (data.num_workers={d.num_workers}); set it to at least {ahead}")

    def batch_sampler(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                      **kw: Any) -> GlobalBatchSampler:
        """The training loop's sampler (dodo/train/loop.py asks the task for one)."""
        if not self.cfg.model.clip.hard_samples.sampling:
            return GlobalBatchSampler(num_samples, global_batch, rank, world_size, seed, **kw)
        return HardBatchSampler(num_samples, global_batch, rank, world_size, seed, self.bank.epoch_weights, **kw)

    def state_dict(self) -> dict[str, Any]:
        return {"hard_bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["hard_bank"])

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        extra, lines = super().final_report(model)
        stats = self.bank.stats()
        lines = lines + [f"hard-sample bank: {stats['hard.seen_fraction']:.0%} of {len(self.train_set)} pairs seen, "
                         f"mean difficulty ({self.cfg.model.clip.hard_samples.difficulty}) "
                         f"{stats['hard.mean_difficulty']:.3f}, largest weight {stats['hard.max_weight']:.2f}"]
        return {**extra, **stats}, lines
