"""Bottleneck adapters (Houlsby / Pfeiffer / MAGMA) and the wrapper that places them.

Placements, with f the wrapped sub-layer (attention or MLP) and x its input:
  sequential:       y = f(x) + A(f(x))
  parallel:         y = f(x) + A(x)
  scaled_parallel:  y = f(x) + s * A(x), s a learned scalar initialised to 1
where A(h) = W_up act(W_down LN?(h) + b_down) + b_up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dodo.adapters.config import AdapterConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """A(h) = W_up act(W_down LN?(h)): d -> d / downsample -> d."""

    def __init__(self, d_model: int, cfg: AdapterConfig):
        super().__init__()
        hidden = max(1, d_model // cfg.downsample)
        self.norm = nn.LayerNorm(d_model) if cfg.layer_norm else nn.Identity()
        self.down = nn.Linear(d_model, hidden)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(hidden, d_model)
        self.reset_parameters(cfg.init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        # MAGMA: N(0, std) clamped to +-2 std, zero biases: the adapter starts near identity.
        for linear in (self.down, self.up):
            nn.init.normal_(linear.weight, std=std)
            linear.weight.clamp_(-2 * std, 2 * std)
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.up(self.dropout(self.act(self.down(self.norm(h)))))


class AdaptedSublayer(nn.Module):
    """Wraps a frozen sub-layer and adds a bottleneck adapter in the configured placement.

    The wrapped module may return a tensor or a tuple whose first item is the hidden state
    (transformers' attention modules return (output, attention weights)); the structure is kept.
    """

    def __init__(self, base: nn.Module, d_model: int, cfg: AdapterConfig):
        super().__init__()
        self.base = base
        self.placement = cfg.placement
        self.adapter = BottleneckAdapter(d_model, cfg)
        self.scale = nn.Parameter(torch.ones(())) if cfg.placement == "scaled_parallel" else None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(hidden_states, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        if self.placement == "sequential":
            y = y + self.adapter(y)
        elif self.placement == "parallel":
            y = y + self.adapter(hidden_states)
        else:
            y = y + self.scale * self.adapter(hidden_states)
        return (y, *out[1:]) if isinstance(out, tuple) else y
