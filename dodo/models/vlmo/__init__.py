"""VLMo: a multiway transformer (shared attention, per-modality FFN experts) used as a dual
encoder (ITC retrieval) and as a fusion encoder (ITM re-ranking, MLM).

config.py   VlmoModelConfig (model.vlmo), refused adapter kinds, submit-time checks
model.py    VlmoModel
task.py     the retrieval task with ITM re-ranking (tasks layer; found through FAMILY.task)
"""

from __future__ import annotations

from typing import Any

from dodo.models.registry import FamilySpec, InitState, register
from dodo.models.vlmo.config import REFUSED_ADAPTERS, VlmoConfig, VlmoModelConfig, validate_job

__all__ = ["FAMILY", "VlmoConfig", "VlmoModelConfig"]


def build_model(cfg: VlmoModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
                init: InitState | None = None) -> Any:
    from dodo.models.vlmo.model import VlmoModel

    del init  # VLMo starts from no other run's tensors
    return VlmoModel(cfg, vocab_size, eos_token_id, mask_token_id)


FAMILY = register(FamilySpec(
    name="vlmo",
    config=VlmoModelConfig,
    build_model=build_model,
    task="dodo.models.vlmo.task:build_task",
    refused_adapters=REFUSED_ADAPTERS,
    flavours={"tiny": "model/vlmo_tiny", "base": "model/vlmo_base"},
    validate=validate_job,
    adapter_sites="every multiway block (blocks.*, tower fusion): shared attention (attn, out_proj) and "
                  "each modality's FFN expert (experts.*, fc2)",
))
