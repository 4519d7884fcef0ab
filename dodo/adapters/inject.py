"""Insert adapters into a transformers causal LM and freeze everything else."""

from __future__ import annotations

from torch import nn

from dodo.adapters.bottleneck import AdaptedSublayer
from dodo.adapters.config import AdapterConfig

# Sub-layer attribute names inside one transformer block, per LM family. GPT-2, GPT-Neo and
# GPT-J all keep their blocks in `transformer.h` with `attn` and `mlp` children.
_SUBLAYER = {"attention": "attn", "mlp": "mlp"}


def lm_blocks(lm: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a GPT-2 / GPT-Neo / GPT-J causal LM."""
    try:
        return lm.transformer.h
    except AttributeError as err:
        raise TypeError(f"{type(lm).__name__} has no transformer.h block list; "
                        "supported LM families: gpt2, gpt_neo, gptj") from err


def inject_adapters(lm: nn.Module, cfg: AdapterConfig, d_model: int) -> list[str]:
    """Wrap the configured sub-layers of every block; returns the wrapped module names."""
    if cfg.kind == "none":
        return []
    wrapped = []
    for i, block in enumerate(lm_blocks(lm)):
        for location in dict.fromkeys(cfg.locations):  # de-duplicated, order kept
            attr = _SUBLAYER[location]
            setattr(block, attr, AdaptedSublayer(getattr(block, attr), d_model, cfg))
            wrapped.append(f"transformer.h.{i}.{attr}")
    return wrapped


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
