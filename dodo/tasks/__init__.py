"""Tasks: what one run trains and how it is scored.

A task bundles the model, the train / held-out datasets, the collate function, the periodic
evaluation (run on every rank, reduced) and the final report (rank 0). The training loop
knows nothing else about methods: a model's forward takes the batch's tensors by keyword and
returns the scalar loss. New methods add a task here, found by `model.family`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from dodo.config.schema import JobConfig


class Task(abc.ABC):
    model: nn.Module
    train_set: Dataset
    eval_set: Dataset
    collate: Callable[[list[Any]], dict[str, Any]]

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """Held-out metrics, computed on every rank and reduced; must include 'eval.loss'."""

    @abc.abstractmethod
    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        """Rank 0, after training: extra metrics for summary.json and lines to print."""


def build_task(cfg: JobConfig) -> Task:
    if cfg.model.family == "magma":
        from dodo.tasks.captioning import CaptioningTask
        return CaptioningTask(cfg)
    if cfg.model.family == "clip" and cfg.model.clip.objective != "contrastive":
        from dodo.tasks.masked import MaskedTask  # mim / mlm pretext (masked adapters)
        return MaskedTask(cfg)
    if cfg.model.family == "vlmo":
        from dodo.tasks.vlmo import VlmoRetrievalTask  # ITC + ITM (+ MLM), ITM re-ranking
        return VlmoRetrievalTask(cfg)
    if cfg.model.family in ("clip", "vlmo"):
        from dodo.tasks.contrastive import ContrastiveTask
        return ContrastiveTask(cfg)
    raise ValueError(f"no task for model.family={cfg.model.family!r}")
