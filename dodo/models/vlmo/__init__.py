"""VLMo: a multiway transformer (shared attention, per-modality FFN experts) used as a dual
encoder (ITC retrieval) and as a fusion encoder (ITM re-ranking, MLM).

config.py   VlmoModelConfig (model.vlmo: sizes, stage, losses, heads), refused adapter kinds, submit-time checks
model.py    VlmoModel (multiway or standard blocks, dual / fusion encoder, the stages' losses)
pretrain.py BEiT block-wise masking, visual-token targets, what each stage trains, stage weights
gather.py   ITC and hard negatives over the features of every rank (gradient-preserving all-gather)
heads.py    VQA and NLVR2 heads
task.py     the retrieval task with ITM re-ranking, and the mim / mlm stage task (tasks layer)
"""

from __future__ import annotations

from dodo.models.registry import FamilySpec, register
from dodo.models.vlmo.config import REFUSED_ADAPTERS, VlmoConfig, VlmoModelConfig, default_suites, validate_job

__all__ = ["FAMILY", "VlmoConfig", "VlmoModelConfig"]


FAMILY = register(FamilySpec(
    name="vlmo",
    config=VlmoModelConfig,
    model="dodo.models.vlmo.model:build",
    task="dodo.models.vlmo.task:build_task",
    eval_hooks=("encode_images", "encode_texts"),
    default_suites=("retrieval",),
    suites_for=default_suites,
    refused_adapters=REFUSED_ADAPTERS,
    flavours={"tiny": "model/vlmo_tiny", "base": "model/vlmo_base", "large": "model/vlmo_large"},
    validate=validate_job,
    adapter_sites="every multiway block (blocks.*, tower fusion): shared attention (attn, out_proj) and "
                  "each modality's FFN expert (experts.*, fc2; experts.shared with model.vlmo.multiway=false)",
))
