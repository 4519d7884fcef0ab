"""Bottleneck adapters (Houlsby / Pfeiffer / MAGMA) and the wrapper that places them.

Placements, with f the wrapped sub-layer (attention or MLP) and x its input:
  sequential:       y = f(x) + A(f(x))
  parallel:         y = f(x) + c * A(x), c = cfg.scaling (fixed; AdapterHub's par_bn uses 4)
  scaled_parallel:  y = f(x) + s * A(x), s a learned scalar initialised to cfg.scaling (1)
where A(h) = W_up act(W_down LN?(h) + b_down) + b_up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import dodo_kernels
from dodo.adapters.config import AdapterConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


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
        fused = self.fused_add(None, h)
        if fused is not None:
            return fused
        return self.up(self.dropout(self.act(self.down(self.norm(h)))))

    def fused_add(self, residual: torch.Tensor | None, h: torch.Tensor,
                  scale: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """residual + scale * A(h) in one fused kernel (dodo_kernels.bottleneck_adapter), or
        None where it does not apply: then the caller runs the modules above. The kernel runs
        on CUDA with Triton (docs/kernels.md); on CPU, POWER9 or without Triton this is always
        None, so results there are those of the plain modules, bit for bit."""
        act = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu"}.get(type(self.act))
        if (act is None or getattr(self.act, "approximate", "none") != "none"
                or not isinstance(self.norm, nn.Identity)
                or (self.training and self.dropout.p > 0)
                or not dodo_kernels.use_triton(h, self.down.out_features <= dodo_kernels.MAX_HIDDEN,
                                               "bottleneck adapter")):
            return None
        if isinstance(scale, (int, float)):
            scale = None if scale == 1 else torch.full((), float(scale), device=h.device)
        return dodo_kernels.bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight,
                                               self.up.bias, residual, scale, act)


class AdaptedSublayer(nn.Module):
    """Wraps a frozen sub-layer and adds a bottleneck adapter in the configured placement.

    The wrapped module may return a tensor or a tuple whose first item is the hidden state
    (transformers' attention modules return (output, attention weights)); the structure is kept.
    """

    is_dodo_adapter = True
    output_params = ("adapter.up.weight", "adapter.up.bias")  # zero: the adapter adds nothing

    def __init__(self, base: nn.Module, d_model: int, cfg: AdapterConfig):
        super().__init__()
        self.base = base
        self.placement = cfg.placement
        self.adapter = BottleneckAdapter(d_model, cfg)
        self.scaling = cfg.scaling
        # Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters.
        self.scale = (nn.Parameter(torch.full((1,), float(cfg.scaling)))
                      if cfg.placement == "scaled_parallel" else None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(hidden_states, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        fused = self.adapter.fused_add(  # one kernel on CUDA; None (plain path below) elsewhere
            y, y if self.placement == "sequential" else hidden_states,
            {"sequential": None, "parallel": self.scaling}.get(self.placement, self.scale))
        if fused is not None:
            y = fused
        elif self.placement == "sequential":
            y = y + self.adapter(y)
        elif self.placement == "parallel":
            y = y + self.scaling * self.adapter(hidden_states)  # x * 1.0 == x bitwise
        else:
            y = y + self.scale * self.adapter(hidden_states)
        return (y, *out[1:]) if isinstance(out, tuple) else y
