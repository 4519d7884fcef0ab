"""Prefix tuning (Li & Liang 2021): learned key / value vectors prepended in every attention layer.

Per layer: a learned embedding P (L, d) -> MLP (d -> bottleneck -> 2 d, tanh between) -> the
prefix keys and values (L, d) each, split into heads. Every query attends to the L prefix
positions as well as to its own (the causal / padding mask is extended with L visible columns).

It works with any transformers attention module that dispatches through transformers'
attention interface (CLIP, GPT-2, ViT) and with dodo's own VLMo attention: ``enable_prefix``
registers the attention implementation ``dodo_prefix`` and selects it in the model config;
the function looks for a ``dodo_prefix`` child on the attention module and, where there is
none, computes plain attention. MAM = prefix tuning + a parallel bottleneck adapter on the MLP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dodo.adapters.config import PrefixConfig

IMPLEMENTATION = "dodo_prefix"


class PrefixKV(nn.Module):
    is_dodo_adapter = True
    output_params = ()  # no weight setting turns prefix tuning off exactly

    def __init__(self, d_model: int, n_head: int, cfg: PrefixConfig):
        super().__init__()
        self.length, self.n_head, self.head_dim = cfg.length, n_head, d_model // n_head
        self.embedding = nn.Parameter(torch.randn(cfg.length, d_model) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(d_model, cfg.bottleneck), nn.Tanh(),
                                 nn.Linear(cfg.bottleneck, 2 * d_model))

    def forward(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values, each (B, H, L, head_dim)."""
        kv = self.mlp(self.embedding).to(dtype)  # (L, 2 d)
        kv = kv.view(self.length, 2, self.n_head, self.head_dim).permute(1, 2, 0, 3)  # (2, H, L, hd)
        k, v = kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)
        return k, v


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the module's prefix prepended. query/key/value: (B, H, T, hd);
    attention_mask: additive (B or 1, 1, Tq, Tk) or None. Returns ((B, Tq, H, hd), weights)."""
    b, _, tq, hd = query.shape
    tk = key.shape[2]
    scaling = hd ** -0.5 if scaling is None else scaling
    if attention_mask is None and getattr(module, "is_causal", False) and tq > 1:
        # j may see i when j <= i + (Tk - Tq) (queries are the last Tq positions)
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
        attention_mask = torch.zeros(tq, tk, dtype=query.dtype, device=query.device)
        attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
    prefix = getattr(module, "dodo_prefix", None)
    if prefix is not None:
        pk, pv = prefix(b, key.dtype)  # (B, H, L, hd)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is not None:
            attention_mask = F.pad(attention_mask, (prefix.length, 0), value=0.0)  # prefix always visible
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, L + Tk)
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Tq, H, hd)
    return out, weights


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, prefix_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def enable_prefix(model: nn.Module) -> None:
    """Route every transformers config inside ``model`` through ``prefix_attention``."""
    register()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = IMPLEMENTATION
