"""MAGMA: an image encoder's patch features as a prefix to a frozen causal LM with adapters.

config.py   MagmaModelConfig (model.lm, model.image_encoder, model.prefix_dropout)
model.py    MagmaModel: prefix projection, adapters / MoE adapters in the LM blocks, generation
task.py     the captioning task (tasks layer; found through FAMILY.task)
"""

from __future__ import annotations

from typing import Any

from dodo.models.magma.config import ImageEncoderConfig, LMConfig, MagmaModelConfig
from dodo.models.registry import FamilySpec, InitState, register

__all__ = ["FAMILY", "ImageEncoderConfig", "LMConfig", "MagmaModelConfig"]


def build_model(cfg: MagmaModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
                init: InitState | None = None) -> Any:
    from dodo.models.magma.model import MagmaModel

    del mask_token_id  # a causal LM masks nothing
    dense = init.dense_state if init is not None else None
    return MagmaModel(cfg, vocab_size=vocab_size, eos_token_id=eos_token_id, dense_state=dense)


FAMILY = register(FamilySpec(
    name="magma",
    config=MagmaModelConfig,
    build_model=build_model,
    task="dodo.models.magma.task:build_task",
    supports_moe=True,
    flavours={"tiny": "model/tiny", "gptj": "model/magma_gptj"},
    adapter_sites="every LM block (transformer.h.*): attention (attn, out projection) and MLP (mlp)",
))
