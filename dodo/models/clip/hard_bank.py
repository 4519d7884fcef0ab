"""The hard-sample memory bank: each training pair's difficulty, its loss weight and sampling weight.

``DifficultyBank`` holds, for the N pairs of the training set, a difficulty ``d`` (N,) float64
and whether the pair was seen. Every training forward (``weighted_loss``) computes the per-pair
InfoNCE terms, weighs them with the bank's weights *before* this batch's update, then gathers
(index, difficulty) from every rank (all_gather, rank order) and applies the updates in that
order on every rank, so all ranks hold the same bank:

    first sight: d[k] = v        seen before: d[k] = momentum * d[k] + (1 - momentum) * v
    weight(k) = clip(((d[k] + eps) / (mean(d[seen]) + eps)) ** power, 1 / max_weight, max_weight)
    (1 for a pair not seen yet)

Loss: sum_i w_i l_i / sum_i w_i over the micro-batch (weights normalised to mean 1, so the
loss stays on InfoNCE's scale). Sampling: the weights of epoch e >= 1 are frozen when
``e * batches_per_epoch - min(snapshot_lag, batches_per_epoch)`` optimizer steps are done (a
micro-step counter: ``grad_accum`` forwards make a step) and read by the sampler
(dodo/data/hard_sampler.py). The bank, its counter and its frozen weights are the task's
checkpoint state (``state_dict``), so a resumed run draws the same order.

Why hand-written: no library keeps a distributed per-sample difficulty bank; the update is a
few lines, and ``per_pair_info_nce``'s mean is tested equal to ``dodo.losses.info_nce`` (its twin).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dodo.losses import positives_from_ids
from dodo.models.clip.config import HardSamplesConfig


def per_pair_info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                      positive_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), rank (B,)) of each pair under CLIP's symmetric InfoNCE (image, text: (B, D)).

    loss_i = (CE of row i over texts + CE of column i over images) / 2, targets spread over the
    positives (samples sharing ``positive_ids``) as ``dodo.losses.info_nce`` does: its mean is
    that loss. rank_i = (negatives outscoring pair i's own logit in its row + in its column) / 2."""
    logits = logit_scale * image @ text.T  # (B, B)
    b = logits.shape[0]
    pos = positives_from_ids(positive_ids) if positive_ids is not None else \
        torch.eye(b, dtype=torch.bool, device=logits.device)  # (B, B)
    target = pos.to(logits.dtype)
    target = target / target.sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1)  # (B,)
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1)  # (B,): the relation is symmetric
    own = logits.diagonal()  # (B,)
    neg = ~pos
    rank = 0.5 * (((logits > own[:, None]) & neg).sum(1) + ((logits.T > own[:, None]) & neg).sum(1))
    return 0.5 * (i2t + t2i), rank.to(logits.dtype)


class DifficultyBank:
    """Per-pair difficulty of ``num_samples`` training pairs (module docstring)."""

    def __init__(self, num_samples: int, cfg: HardSamplesConfig, batches_per_epoch: int, grad_accum: int = 1):
        self.cfg, self.n = cfg, num_samples
        self.batches_per_epoch, self.grad_accum = batches_per_epoch, grad_accum
        self.d = torch.zeros(num_samples, dtype=torch.float64)  # (N,)
        self.seen = torch.zeros(num_samples, dtype=torch.bool)  # (N,)
        self.forwards = 0  # training forwards (micro-steps) so far
        self.frozen: dict[int, torch.Tensor] = {}  # epoch -> (N,) weights frozen for it
        self._freeze_due(0)

    # ------------------------------------------------------------ weights

    def weights(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """(len(index),) or (N,) float64 weights from the current bank."""
        c = self.cfg
        mean = float(self.d[self.seen].mean()) if bool(self.seen.any()) else 0.0
        d = self.d if index is None else self.d[index]
        seen = self.seen if index is None else self.seen[index]
        w = ((d + c.eps) / (mean + c.eps)) ** c.power
        w = w.clamp(1.0 / c.max_weight, c.max_weight)
        return torch.where(seen, w, torch.ones_like(w))

    def snapshot_step(self, epoch: int) -> int:
        """Optimizer steps done when the weights of ``epoch`` (>= 1) are frozen."""
        return epoch * self.batches_per_epoch - min(self.cfg.snapshot_lag, self.batches_per_epoch)

    def epoch_weights(self, epoch: int) -> Optional[np.ndarray]:
        """The (N,) weights frozen for ``epoch`` (the sampler's input), None if not frozen yet."""
        w = self.frozen.get(epoch)
        return None if w is None else w.numpy()

    def _freeze_due(self, steps: int) -> None:
        epoch = steps // self.batches_per_epoch + 1  # the only epoch whose snapshot can fall here
        if self.snapshot_step(epoch) == steps and epoch not in self.frozen:
            self.frozen[epoch] = self.weights().clone()
        for old in [e for e in self.frozen if e < steps // self.batches_per_epoch]:
            del self.frozen[old]  # epochs already over

    # ------------------------------------------------------------ updates

    def update(self, index: torch.Tensor, value: torch.Tensor) -> None:
        """Apply (index (M,), difficulty (M,)) in order: a pair drawn twice is updated twice."""
        m = self.cfg.momentum
        for k, v in zip(index.tolist(), value.double().tolist()):
            self.d[k] = m * self.d[k] + (1 - m) * v if self.seen[k] else v
            self.seen[k] = True

    def gather(self, index: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (index, value), concatenated in rank order (collective)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return index.cpu(), value.detach().double().cpu()
        pair = torch.stack([index.double(), value.detach().double()])  # (2, B): one all_gather
        parts = [torch.empty_like(pair) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, pair)
        both = torch.cat(parts, dim=1).cpu()  # (2, W * B)
        return both[0].long(), both[1]

    def weighted_loss(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                      positive_ids: torch.Tensor | None, sample_index: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss with instance weights, then the bank update (collective)."""
        loss, rank = per_pair_info_nce(image, text, logit_scale, positive_ids)  # (B,), (B,)
        if self.cfg.loss_weights:
            w = self.weights(sample_index.cpu()).to(loss.device, loss.dtype)  # (B,)
            out = (w * loss).sum() / w.sum()
        else:
            out = loss.mean()
        value = loss.detach() if self.cfg.difficulty == "loss" else rank
        self.update(*self.gather(sample_index, value))
        self.forwards += 1
        if self.forwards % self.grad_accum == 0:
            self._freeze_due(self.forwards // self.grad_accum)
        return out

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d.clone(), "seen": self.seen.clone(), "forwards": self.forwards,
                "frozen": {int(e): w.clone() for e, w in self.frozen.items()}, "num_samples": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.n:
            raise ValueError(f"the checkpoint's hard-sample bank holds {state['num_samples']} pairs, the "
                             f"training set has {self.n}; resume on the same data")
        self.d, self.seen = state["d"].clone().double(), state["seen"].clone().bool()
        self.forwards = int(state["forwards"])
        self.frozen = {int(e): w.clone().double() for e, w in state["frozen"].items()}

    def stats(self) -> dict[str, float]:
        seen = self.d[self.seen]
        w = self.weights()
        return {"hard.seen_fraction": float(self.seen.double().mean()),
                "hard.mean_difficulty": float(seen.mean()) if len(seen) else 0.0,
                "hard.max_weight": float(w.max())}
