"""Prompt learning on a frozen CLIP: CoOp (shared or class-specific context vectors) and
structured prompts (general + domain (class) + instance prompt from visual-guided attention),
trained few-shot on a labelled cache and scored on base (seen) and new (unseen) classes.

config.py   PromptModelConfig (model.clip: the frozen towers; model.prompt), submit-time checks
model.py    PromptCLIP: prompt assembly, the text tower on input embeddings, logits
task.py     PromptTask: the few-shot subset, base-to-new scoring, the hand-crafted baseline
"""

from __future__ import annotations

from dodo.models.prompt.config import REFUSED_ADAPTERS, PromptConfig, PromptModelConfig, validate_job
from dodo.models.registry import FamilySpec, register

__all__ = ["FAMILY", "PromptConfig", "PromptModelConfig"]


FAMILY = register(FamilySpec(
    name="prompt",
    config=PromptModelConfig,
    model="dodo.models.prompt.model:build",
    task="dodo.models.prompt.task:build_task",
    refused_adapters=REFUSED_ADAPTERS,
    eval_hooks=("encode_images", "encode_texts"),
    default_suites=(),
    validate=validate_job,
    adapter_sites="none: the learned prompt vectors are the only trained parameters "
                  "(plus the instance prompt's attention for method=structured)",
))
