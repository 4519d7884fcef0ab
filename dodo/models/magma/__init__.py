"""MAGMA: an image encoder's patch features as a prefix to a frozen causal LM with adapters.

config.py   MagmaModelConfig (model.lm, model.image_encoder, model.prefix_dropout)
model.py    MagmaModel: prefix projection, adapters / MoE adapters in the LM blocks, generation
task.py     the captioning task (tasks layer; found through FAMILY.task)
"""

from __future__ import annotations

from dodo.models.magma.config import ImageEncoderConfig, LMConfig, MagmaModelConfig, check_sources
from dodo.models.registry import FamilySpec, register

__all__ = ["FAMILY", "ImageEncoderConfig", "LMConfig", "MagmaModelConfig"]


FAMILY = register(FamilySpec(
    name="magma",
    config=MagmaModelConfig,
    model="dodo.models.magma.model:build",
    task="dodo.models.magma.task:build_task",
    supports_moe=True,
    eval_hooks=("generate",),
    default_suites=("captioning",),
    flavours={"tiny": "model/tiny", "gptj": "model/magma_gptj"},
    adapter_sites="every LM block (transformer.h.*): attention (attn, out projection) and MLP (mlp)",
    validate=check_sources,
))
