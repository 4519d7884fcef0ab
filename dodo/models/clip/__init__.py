"""CLIP: a dual encoder (transformers CLIPModel) with adapters in both towers.

config.py        ClipModelConfig (model.clip)
model.py         ClipDualEncoder: InfoNCE / MPM-NCE (+ MIM, MLM), frozen adapters of earlier runs
task.py          the task: contrastive (dodo/tasks/contrastive.py) or a masked pretext stage
task_masked.py   the MIM / MLM pretext tasks (masked adapters)
"""

from __future__ import annotations

from dodo.models.clip.config import ClipConfig, ClipModelConfig, default_suites, validate_job
from dodo.models.registry import FamilySpec, register

__all__ = ["FAMILY", "ClipConfig", "ClipModelConfig"]


FAMILY = register(FamilySpec(
    name="clip",
    config=ClipModelConfig,
    model="dodo.models.clip.model:build",
    task="dodo.models.clip.task:build_task",
    eval_hooks=("encode_images", "encode_texts"),
    default_suites=("retrieval",),
    suites_for=default_suites,
    validate=validate_job,  # a masked pretext stage's cache modality (MIM: images, MLM: texts)
    flavours={"tiny": "model/clip_tiny", "vitb16": "model/clip_vitb16"},
    adapter_sites="every encoder layer of both towers (vision_model / text_model.encoder.layers.*): "
                  "attention (self_attn, out_proj) and MLP (mlp, fc2)",
))
