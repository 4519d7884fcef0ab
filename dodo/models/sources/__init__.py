"""Model sources: build a frozen tower from local weights in the format a researcher has them.

    from dodo.models.sources import SourceConfig, check_source, load_source
    check_source(cfg, "model.image_encoder.source")    # submit time, no torch
    tower = load_source(cfg, "model.image_encoder.source")  # run time: frozen, eval, dtype per device

Kinds: ``hf`` (a save_pretrained directory), ``open_clip`` (an open_clip architecture name + a
.pt / .bin / .safetensors file), ``timm`` (a timm model name + weights), ``random`` (the family
builds its own random tower). docs/models.md lists the keys and an example per real model.
This module stays torch-free at import: the loaders are imported when called.
"""

from __future__ import annotations

from typing import Any

from dodo.models.sources.config import SourceConfig, check_source

__all__ = ["SourceConfig", "check_source", "load_source", "load_tokenizer"]


def load_source(cfg: SourceConfig, key: str = "source", device: Any = None) -> Any:
    """The tower ``cfg`` describes (an nn.Module), frozen and in eval mode; None for kind random."""
    check_source(cfg, key)
    if cfg.kind == "hf":
        from dodo.models.sources.hf import load_hf
        return load_hf(cfg, key, device)
    if cfg.kind == "open_clip":
        from dodo.models.sources.openclip import load_open_clip
        return load_open_clip(cfg, key, device)
    if cfg.kind == "timm":
        from dodo.models.sources.timmvit import load_timm
        return load_timm(cfg, key, device)
    return None


def load_tokenizer(cfg: SourceConfig) -> Any:
    """The tokenizer that follows the source: open_clip's BPE for open_clip text towers, the
    directory's own tokenizer for hf; None where the source has no text side (timm, random)."""
    if cfg.kind == "open_clip":
        from dodo.models.sources.openclip import open_clip_tokenizer
        return open_clip_tokenizer(cfg.arch)
    if cfg.kind == "hf":
        from dodo.models.sources.hf import load_hf_tokenizer
        return load_hf_tokenizer(cfg.path)
    return None
