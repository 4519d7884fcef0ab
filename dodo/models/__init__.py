"""Model families, one folder each (magma, clip, vlmo), registered once and found by
``model.family`` (dodo/models/registry.py). ``sources/`` loads pretrained towers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dodo.models.config import ModelConfig
from dodo.models.registry import InitState
from dodo.models.registry import build_model as _build

if TYPE_CHECKING:  # torch is imported lazily: `dodo submit --dry-run` and `dodo status` stay torch-free
    from torch import nn


def build_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int,
                mask_token_id: int | None = None, init: InitState | None = None) -> nn.Module:
    """The model of ``cfg.family``; ``init`` carries tensors read from other runs (or None)."""
    return _build(cfg, vocab_size, eos_token_id, mask_token_id, init)
