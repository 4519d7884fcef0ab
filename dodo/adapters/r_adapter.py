"""R-Adapter (arXiv 2408.05749): a linear residual adapter after a linear layer.

Row-vector convention, y the output of the wrapped layer (..., d):

    h = y + s * y W_adp                 W_adp = W (d x d, init 0)  or  B A (B: d x r Xavier, A: r x d zero)

Training: the branch is dropped per sample with probability p, kept ones scaled by 1 / (1 - p).
Evaluation: the exponential moving average of (W, s) (momentum m) replaces them, re-scaled by
alpha: h = y + alpha s~ y W~ (a weight-space ensemble with the frozen layer: alpha = 0 is the
frozen model, alpha = 1 the adapted one). ``merge()`` re-parameterises the evaluation-time
adapter into the wrapped layer: for nn.Linear (y = x W_l^T + b),
W_l <- (I + c W_adp^T) W_l and b <- (I + c W_adp^T) b with c = alpha s~; unmerge restores the
original weights exactly (they are kept while merged).

The EMA is updated at the start of every ``ema_every``-th training forward (= once per
optimizer step; the task sets it to train.grad_accum), from the weights of the previous step,
so it lags the live weights by one step; it needs no hook in the training loop.

``ema_kind: bma`` replaces the exponential average by the uniform running mean of the weights
(METHODS.md names only the EMA, W~ <- m W~ + (1 - m) W, m = 0.999; "BMA" is the seed's
alternative without a formula; we implement the stochastic-weight-averaging form of a
Bayesian model average over the trajectory): with W_t the weights after optimizer step t
(1-based) and t0 = bma_start,

    W~ = W_t                                  t < t0     (tracks the live weights)
    W~ = 1 / (t - t0 + 1) sum_{u=t0..t} W_u   t >= t0    (as W~ += (W_t - W~) / (t - t0 + 1))

for W_adp and s alike. The step count is a buffer (``bma_step``, saved in checkpoints), so a
resumed run folds the checkpoint step's weights at its first forward and continues the same mean.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dodo.adapters.config import RAdapterConfig
from dodo.adapters.lora import linear_dims


class RAdapterLinear(nn.Module):
    is_dodo_adapter = True
    output_params = ("scale",)  # s = 0: the frozen model (WiSE's zero-shot end)

    def __init__(self, base: nn.Module, cfg: RAdapterConfig):
        super().__init__()
        _, d = linear_dims(base)
        self.base = base
        self.rank = cfg.rank
        if cfg.rank == 0:
            self.weight = nn.Parameter(torch.zeros(d, d))
        else:
            self.down = nn.Parameter(torch.empty(d, cfg.rank))
            self.up = nn.Parameter(torch.zeros(cfg.rank, d))
            nn.init.xavier_uniform_(self.down)
        self.scale = nn.Parameter(torch.full((1,), float(cfg.scale_init)))  # (1,): DeepSpeed broadcasts no 0-dim
        self.drop_prob = cfg.drop_prob
        self.use_ema = cfg.ema
        self.momentum = cfg.ema_momentum
        self.ema_kind = cfg.ema_kind
        self.bma_start = cfg.bma_start
        self.alpha = cfg.alpha
        self.ema_every = 1
        self._train_calls = 0
        for name, p in self._adapter_params().items():
            self.register_buffer(f"ema_{name}", p.detach().clone())
        if self.ema_kind == "bma":  # optimizer steps begun so far; (1,): DeepSpeed broadcasts no 0-dim
            self.register_buffer("bma_step", torch.zeros(1, dtype=torch.long))
        self.merged = False
        self._saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        names = ("weight",) if self.rank == 0 else ("down", "up")
        return {n: getattr(self, n) for n in (*names, "scale")}

    @torch.no_grad()
    def update_ema(self) -> None:
        for name, p in self._adapter_params().items():
            ema = getattr(self, f"ema_{name}")
            ema.lerp_(p.detach().to(ema.dtype), 1.0 - self.momentum)

    @torch.no_grad()
    def update_bma(self, step: int) -> None:
        """Fold W_step (the live weights, after optimizer step ``step``, 1-based) into the mean."""
        n = step - self.bma_start + 1  # weights in the mean, this one included
        for name, p in self._adapter_params().items():
            ema = getattr(self, f"ema_{name}")
            if n <= 0:
                ema.copy_(p.detach().to(ema.dtype))
            else:
                ema.add_((p.detach().to(ema.dtype) - ema) / n)

    def _step_start(self) -> None:
        """At the first forward of an optimizer step: fold the previous step's weights."""
        if self.ema_kind == "bma":
            done = int(self.bma_step)  # steps finished: their last weights are the live ones
            if done > 0:
                self.update_bma(done)
            self.bma_step += 1
        elif self._train_calls > 0:
            self.update_ema()

    def matrix(self, ema: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_adp (d, d), s): the live weights, or their EMA."""
        get = (lambda n: getattr(self, f"ema_{n}")) if ema else (lambda n: getattr(self, n))
        w = get("weight") if self.rank == 0 else get("down") @ get("up")
        return w, get("scale")

    def _branch(self, y: torch.Tensor, ema: bool) -> torch.Tensor:  # (..., d) -> (..., d)
        get = (lambda n: getattr(self, f"ema_{n}")) if ema else (lambda n: getattr(self, n))
        z = y @ get("weight").to(y.dtype) if self.rank == 0 else (y @ get("down").to(y.dtype)) @ get("up").to(y.dtype)
        return get("scale").to(y.dtype) * z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        if self.training:
            if self.use_ema and torch.is_grad_enabled():
                if self._train_calls % self.ema_every == 0:
                    self._step_start()
                self._train_calls += 1
            branch = self._branch(y, ema=False)
            if self.drop_prob > 0:  # adapter dropping, per sample
                keep = torch.rand((y.shape[0],) + (1,) * (y.dim() - 1), device=y.device) >= self.drop_prob
                branch = branch * keep.to(y.dtype) / (1.0 - self.drop_prob)
            return y + branch
        return y + self.alpha * self._branch(y, ema=self.use_ema)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the evaluation-time adapter (EMA, alpha) into the wrapped layer's weights."""
        if self.merged:
            return
        w, s = self.matrix(ema=self.use_ema)
        d = w.shape[0]
        m = torch.eye(d, dtype=torch.float64) + self.alpha * float(s) * w.double()  # (I + c W_adp), row conv.
        weight, bias = self.base.weight, self.base.bias
        self._saved = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        if isinstance(self.base, Conv1D):  # y = x W_c + b: W_c <- W_c (I + c W_adp)
            weight.copy_((weight.double() @ m).to(weight.dtype))
        else:  # nn.Linear, y = x W_l^T + b: W_l <- (I + c W_adp)^T W_l
            weight.copy_((m.T @ weight.double()).to(weight.dtype))
        if bias is not None:
            bias.copy_((bias.double() @ m).to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self._saved is not None:
            self.base.weight.copy_(self._saved[0])
            if self._saved[1] is not None:
                self.base.bias.copy_(self._saved[1])
            self._saved = None
            self.merged = False
