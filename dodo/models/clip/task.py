"""CLIP's task (tasks layer, found through ``dodo.models.clip.FAMILY.task``): the dual-encoder
contrastive task (dodo/tasks/contrastive.py), or, for ``model.clip.objective`` mim / mlm, a
masked pretext stage (task_masked.py)."""

from __future__ import annotations

from dodo.config.schema import JobConfig
from dodo.models.registry import InitState
from dodo.tasks import Task


def build_task(cfg: JobConfig, init: InitState | None = None) -> Task:
    if cfg.model.clip.objective != "contrastive":
        from dodo.models.clip.task_masked import MaskedTask  # mim / mlm pretext (masked adapters)
        return MaskedTask(cfg, init)
    if cfg.model.clip.hard_samples.enabled:  # difficulty bank + weighted sampler (task_hard.py)
        from dodo.models.clip.task_hard import HardSampleTask
        return HardSampleTask(cfg, init)
    from dodo.tasks.contrastive import ContrastiveTask
    return ContrastiveTask(cfg, init)
