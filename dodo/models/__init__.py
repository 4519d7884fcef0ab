"""Model families, one module each, found by `model.family`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dodo.models.config import ModelConfig

if TYPE_CHECKING:  # torch is imported lazily: `dodo submit --dry-run` and `dodo status` stay torch-free
    from torch import nn


def build_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int,
                mask_token_id: int | None = None) -> nn.Module:
    if cfg.family == "magma":
        from dodo.models.magma import MagmaModel
        return MagmaModel(cfg, vocab_size=vocab_size, eos_token_id=eos_token_id)
    if cfg.family == "clip":
        from dodo.models.clip.model import ClipDualEncoder
        return ClipDualEncoder(cfg, vocab_size, eos_token_id, mask_token_id)
    if cfg.family == "vlmo":
        from dodo.models.vlmo.model import VlmoModel
        return VlmoModel(cfg, vocab_size, eos_token_id, mask_token_id)
    raise ValueError(f"unknown model.family {cfg.family!r}")
