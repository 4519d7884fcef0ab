"""CLIP: a dual encoder (transformers CLIPModel) with adapters in both towers.

config.py        ClipModelConfig (model.clip)
model.py         ClipDualEncoder: InfoNCE / MPM-NCE (+ MIM, MLM), frozen adapters of earlier runs
task.py          the task: contrastive (dodo/tasks/contrastive.py) or a masked pretext stage
task_masked.py   the MIM / MLM pretext tasks (masked adapters)
"""

from __future__ import annotations

from typing import Any

from dodo.models.clip.config import ClipConfig, ClipModelConfig
from dodo.models.registry import FamilySpec, InitState, register

__all__ = ["FAMILY", "ClipConfig", "ClipModelConfig"]


def build_model(cfg: ClipModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
                init: InitState | None = None) -> Any:
    from dodo.models.clip.model import ClipDualEncoder

    return ClipDualEncoder(cfg, vocab_size, eos_token_id, mask_token_id,
                           init_adapters=init.adapters if init is not None else None)


FAMILY = register(FamilySpec(
    name="clip",
    config=ClipModelConfig,
    build_model=build_model,
    task="dodo.models.clip.task:build_task",
    flavours={"tiny": "model/clip_tiny", "vitb16": "model/clip_vitb16"},
    adapter_sites="every encoder layer of both towers (vision_model / text_model.encoder.layers.*): "
                  "attention (self_attn, out_proj) and MLP (mlp, fc2)",
))
