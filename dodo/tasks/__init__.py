"""Tasks: what one run trains and how it is scored.

A task bundles the model, the train / held-out datasets, the collate function, the periodic
evaluation (run on every rank, reduced) and the final report (rank 0). The training loop
knows nothing else about methods: a model's forward takes the batch's tensors by keyword and
returns the scalar loss.

Each model family names its task in its ``FamilySpec.task`` (dodo/models/<family>/task.py);
this package holds the generic parts: the ``Task`` base, ``build_task`` (found by
``model.family`` through the registry), the dual-encoder ``ContrastiveTask`` that CLIP and VLMo
share (contrastive.py), the encoder helpers (encoders.py) and the synthetic shapes suite's
logic (shapes.py, the only code here that knows the shapes vocabulary).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable

from dodo.config.schema import JobConfig
from dodo.models import registry
from dodo.models.registry import InitState

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset


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


    def suite_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        """Rank 0, after training: the job's explicit ``eval.suites`` (dodo/eval/suites.py), each
        on its datasets, through this family's hooks. Keys ``eval.<kind>.<dataset>.<metric>``."""
        suites = list(getattr(self.cfg.eval, "suites", None) or [])  # type: ignore[attr-defined]
        if not suites:
            return {}, []
        import functools

        import numpy as np

        from dodo.data.dataset import CachedDataset
        from dodo.data.manifest import describe
        from dodo.eval.runner import SuiteHooks, run_suites

        cfg = self.cfg  # type: ignore[attr-defined]

        def bound(name: str) -> Callable | None:
            return functools.partial(getattr(self, name), model) if hasattr(self, name) else None

        def shapes_ood(suite: Any) -> Any:
            from dodo.eval import shapes
            return shapes.ood_pool(suite.num_ood, suite.ood_holdout or shapes.DEFAULT_HOLDOUT,
                                   cfg.data.image_size, cfg.data.seed)

        gen = bound("generate")
        hooks = SuiteHooks(
            open_cache=lambda path: CachedDataset(path, verify="none"),  # checked at submit
            heldout=self.eval_set, train=self.train_set, describe=describe,
            encode_images=bound("encode_images"), encode_texts=bound("encode_texts"),
            generate=(lambda imgs, **d: gen(np.stack(imgs), **d)) if gen else None,
            shapes_ood=shapes_ood)
        was = model.training
        model.eval()
        try:
            metrics = run_suites(suites, hooks)
        finally:
            model.train(was)
        return metrics, [f"  {k:44} {v:.4f}" for k, v in metrics.items()]


def build_task(cfg: JobConfig, init: InitState | None = None) -> Task:
    """The task of ``cfg.model.family``. ``init``: tensors from other runs (upcycling, adapter
    transfer) that the train layer read (dodo.train.init_from.read_init); None when the job
    names none."""
    spec = registry.family(cfg.model.family)
    return registry.resolve(spec.task)(cfg, init or InitState())


def build_family_model(cfg: Any, tokenizer: Any, init: InitState | None = None) -> nn.Module:
    """The family's model for ``cfg`` (a ModelConfig), sized to ``tokenizer``; its [UNK] (if
    any) is the mask token of masked modelling."""
    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.unk_token) if tokenizer.unk_token else None
    return registry.build_model(cfg, len(tokenizer), tokenizer.eos_token_id, mask_id, init)
