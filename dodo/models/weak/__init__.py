"""Weak language supervision of vision encoders: a timm ViT (DINO / MAE, local checkpoint)
paired with a frozen text encoder.

config.py      WeakModelConfig (model.weak), submit-time checks
vit.py         the timm ViT run block by block (MAE masking, token replay, input tokens)
replay.py      token-replay adapters (dodo's design: docs/methods.md)
reprogram.py   adversarial reprogramming (program + frame mask, label map), cross-modal token map
model.py       WeakModel: MAE + contrastive with adapters (FiLM on language), reprogramming
task.py        the tasks (tasks layer; found through FAMILY.task)
"""

from __future__ import annotations

from dodo.models.registry import FamilySpec, register
from dodo.models.weak.config import WeakConfig, WeakModelConfig, validate_job

__all__ = ["FAMILY", "WeakConfig", "WeakModelConfig"]


FAMILY = register(FamilySpec(
    name="weak",
    config=WeakModelConfig,
    model="dodo.models.weak.model:build",
    task="dodo.models.weak.task:build_task",
    eval_hooks=("encode_images", "encode_texts"),
    default_suites=(),  # explicit eval.suites only: reprogramming data has labels, not captions
    refused_adapters={"prefix": "timm's fused attention has no key/value hook for prefixes",
                      "mam": "it pairs prefix tuning, which timm's attention has no hook for, with an adapter"},
    flavours={"tiny": "model/weak_tiny", "vitb16_dino": "model/weak_vitb16_dino"},
    validate=validate_job,
    adapter_sites="every block of the ViT (vit.blocks.*): attention (attn, attn.proj) and MLP (mlp, mlp.fc2); "
                  "LoRA targets qkv / proj / fc1 / fc2; token replay between blocks (model.weak.replay)",
))
