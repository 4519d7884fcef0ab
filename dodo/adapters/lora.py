"""LoRA (Hu et al. 2021), numerically the same as PEFT's given the same weights.

    y = W x + b + (alpha / r) * B A dropout(x)        A: (r, in) Kaiming-uniform, B: (out, r) zero

Wraps an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's y = x W + b with W (in, out)).
``merge()`` folds (alpha / r) B A into the base weight, ``unmerge()`` takes it back out.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dodo.adapters.config import LoRAConfig


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """weight += delta, with delta in nn.Linear layout (out, in) whatever the module type."""
    if isinstance(module, Conv1D):
        module.weight += delta.T.to(module.weight.dtype)
    else:
        module.weight += delta.to(module.weight.dtype)


class LoRALinear(nn.Module):
    is_dodo_adapter = True
    output_params = ("lora_B.weight",)  # zero: the adapter is off (WiSE's zero-shot end)

    def __init__(self, base: nn.Module, cfg: LoRAConfig):
        super().__init__()
        in_features, out_features = linear_dims(base)
        self.base = base
        self.r = cfg.r
        self.scaling = cfg.alpha / cfg.r
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))).to(y.dtype) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            add_to_weight(self.base, self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            add_to_weight(self.base, -self.delta_weight())
            self.merged = False
