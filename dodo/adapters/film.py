"""FiLM (Perez et al. 2018): feature-wise affine modulation of a sub-layer's output.

    h <- (1 + gamma(c)) * h + beta(c)        gamma, beta: Linear(cond_dim -> d), zero-initialised

The condition c (B, cond_dim) is set on a shared ``FiLMCondition`` holder by the model before
the forward of the modulated tower: the other modality's pooled feature (MAGMA: the image's
mean patch feature conditions every LM layer), a learned task embedding, or language: a frozen
text encoder's embedding of a caption or a fixed prompt (``set_text``; the weak family).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FiLMCondition(nn.Module):
    """Holds the current condition; with ``num_tasks`` it owns the task embeddings too."""

    is_dodo_adapter = True
    output_params = ()

    def __init__(self, cond_dim: int, num_tasks: int = 0):
        super().__init__()
        self.cond_dim = cond_dim
        self.tasks = nn.Embedding(num_tasks, cond_dim) if num_tasks else None
        if self.tasks is not None:
            nn.init.normal_(self.tasks.weight, std=1.0)
        self.value: torch.Tensor | None = None  # (B, cond_dim)

    def set(self, cond: torch.Tensor) -> None:
        self.value = cond

    def set_text(self, embedding: torch.Tensor) -> None:
        """Language condition: (B, cond_dim) or (cond_dim,) frozen text embeddings (captions, or
        one prompt for the whole batch), L2-normalised so gamma / beta see unit-norm inputs
        whatever the text encoder's scale; no gradient flows into the frozen encoder."""
        emb = embedding.detach()
        self.value = torch.nn.functional.normalize(emb[None] if emb.dim() == 1 else emb, dim=-1)

    def set_task(self, task_ids: torch.Tensor) -> None:  # (B,) long
        assert self.tasks is not None, "FiLM condition 'task' needs num_tasks >= 1"
        self.value = self.tasks(task_ids)


class FiLMSublayer(nn.Module):
    is_dodo_adapter = True
    output_params = ("gamma.weight", "gamma.bias", "beta.weight", "beta.bias")

    def __init__(self, base: nn.Module, d_model: int, condition: FiLMCondition):
        super().__init__()
        self.base = base
        self.gamma = nn.Linear(condition.cond_dim, d_model)
        self.beta = nn.Linear(condition.cond_dim, d_model)
        for linear in (self.gamma, self.beta):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        # A plain attribute, not a child: the condition is registered once, on the model.
        object.__setattr__(self, "condition", condition)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(hidden_states, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        c = self.condition.value
        if c is None:
            raise RuntimeError("FiLM adapter has no condition: the model must set it before the forward")
        c = c.to(y.dtype)
        shape = (c.shape[0],) + (1,) * (y.dim() - 2) + (y.shape[-1],)
        y = y * (1 + self.gamma(c).view(shape)) + self.beta(c).view(shape)
        return (y, *out[1:]) if isinstance(out, tuple) else y
