"""Token-replay adapters (dodo's design for the seed's unnamed method; docs/methods.md).

The seed names "token-replay adapters" without a definition. Design: an early block's output
tokens carry low-level detail that later blocks of a frozen encoder have partly discarded; the
adapter *replays* them into later blocks through a small, gated residual branch:

    s   = H_src                       tokens after block ``source_layer``       (B, S, d)
          (tokens: cls -> s = H_src[:, :1], broadcast over every position)
    H_t <- H_t + tanh(g_t) * U_t GELU(D_t LN_t(s))   before each block t in ``target_layers``

D_t: d -> r, U_t: r -> d (r = ``bottleneck``), one set per target block; g_t a scalar gate
initialised at ``gate_init``. With g_t = 0 the branch is exactly zero, so the frozen encoder's
output is unchanged at the start (as for the other adapters), while U_t is small-normal, not
zero: dL/dg_t = (1 - tanh^2 g_t) <dL/dH_t, U_t GELU(D_t LN_t(s))> is then non-zero and the gate
opens (with U_t = 0 as well, neither would ever move).

Under MAE masking the source tokens are the visible ones, position for position, so replay
needs no gather.
"""

from __future__ import annotations

import torch
from torch import nn


class ReplayBranch(nn.Module):
    def __init__(self, d: int, r: int, gate_init: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.up.bias)
        self.gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def forward(self, source: torch.Tensor) -> torch.Tensor:  # (B, S, d) -> (B, S, d)
        return torch.tanh(self.gate) * self.up(nn.functional.gelu(self.down(self.norm(source))))


class TokenReplay(nn.Module):
    """Records block ``source``'s output and adds the gated branches before the target blocks."""

    is_dodo_adapter = True
    output_params = ()

    def __init__(self, d: int, depth: int, source: int, targets: list[int], tokens: str = "all",
                 bottleneck: int = 16, gate_init: float = 0.0):
        super().__init__()
        targets = sorted(set(targets)) or list(range(source + 1, depth))
        if not 0 <= source < depth - 1 or not targets or targets[-1] >= depth:
            raise ValueError(f"model.weak.replay: source_layer={source}, target_layers={targets} do not fit "
                             f"a ViT of {depth} blocks; source must be < {depth - 1} and targets < {depth}")
        self.source, self.tokens = source, tokens
        self.branches = nn.ModuleDict({str(t): ReplayBranch(d, bottleneck, gate_init) for t in targets})
        self._saved: torch.Tensor | None = None

    def after(self, i: int, x: torch.Tensor) -> None:
        if i == self.source:
            self._saved = x[:, :1] if self.tokens == "cls" else x  # (B, 1 | S, d)

    def before(self, i: int, x: torch.Tensor) -> torch.Tensor:
        branch = self.branches[str(i)] if str(i) in self.branches else None
        if branch is None:
            return x
        assert self._saved is not None, "token replay: the source block has not run"
        return x + branch(self._saved)  # (B, 1, d) broadcasts over positions for tokens=cls
