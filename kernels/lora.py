"""Fused LoRA: y = base_out + scale * (drop(x) A^T) B^T.

Layers (STYLE point 5): Triton kernels in triton_lora.py -> launchers registered as
``torch.ops.dodo_kernels.lora_fwd`` / ``lora_bwd`` (with fake implementations, so
torch.compile traces through them) -> ``LoRAFunction`` (autograd) -> ``lora()`` which picks
the kernel or the reference (dispatch.py). ``lora_reference`` is the plain PyTorch twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

BM, BK, BN = 32, 64, 64


def lora_reference(x: Tensor, a: Tensor, b: Tensor, base: Tensor | None = None, scale: float = 1.0,
                   dropout: float = 0.0, training: bool = False, mask: Tensor | None = None) -> Tensor:
    """x (..., K), a (R, K), b (N, R), base (..., N). ``mask`` (bool, like x) replaces the
    random dropout mask (the tests pass the kernel's mask to compare exactly)."""
    if mask is not None:
        x = x * mask / (1.0 - dropout)
    elif dropout > 0.0:
        x = F.dropout(x, dropout, training)
    delta = F.linear(F.linear(x, a), b) * scale
    return delta if base is None else base + delta


def _shape_ok(rank: int) -> bool:
    return rank <= 128  # h (BM x R) lives in registers


@torch.library.custom_op("dodo_kernels::lora_fwd", mutates_args=())
def lora_fwd(x: Tensor, a: Tensor, b: Tensor, base: Tensor | None, scale: float, p: float,
             seed: int) -> tuple[Tensor, Tensor]:
    """x (M, K), a (R, K), b (N, R), base (M, N) or None -> y (M, N), h (M, R) fp32."""
    from . import triton_lora as tk
    from .triton_common import dot_dtype, precision
    (m, k), r, n = x.shape, a.shape[0], b.shape[0]
    y = dispatch.empty((m, n), x.dtype, x.device)
    h = dispatch.empty((m, r), torch.float32, x.device)
    tk.lora_fwd_kernel[(triton_cdiv(m, BM),)](
        x, a, b, base if base is not None else x, y, h, m, k, n, r, scale, p, seed,
        HAS_BASE=base is not None, DROPOUT=p > 0.0, BM=BM, BK=BK, BN=BN,
        BR=dispatch.next_pow2(r), DT=dot_dtype(x.dtype), PREC=precision(x.dtype))
    return y, h


@lora_fwd.register_fake
def _(x, a, b, base, scale, p, seed):
    return x.new_empty((x.shape[0], b.shape[0])), x.new_empty((x.shape[0], a.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dodo_kernels::lora_bwd", mutates_args=())
def lora_bwd(g: Tensor, x: Tensor, a: Tensor, b: Tensor, h: Tensor, scale: float, p: float,
             seed: int, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (M, K) (empty when not need_dx), dA (R, K), dB (N, R)."""
    from . import triton_lora as tk
    from .triton_common import dot_dtype, n_splits, precision
    (m, k), r, n = x.shape, a.shape[0], b.shape[0]
    br, dt, prec = dispatch.next_pow2(r), dot_dtype(x.dtype), precision(x.dtype)
    dh = dispatch.empty((m, r), torch.float32, x.device)
    dx = dispatch.empty((m, k) if need_dx else (0, k), x.dtype, x.device)
    tk.lora_bwd_dx_kernel[(triton_cdiv(m, BM),)](
        g, a, b, dh, dx, m, k, n, r, scale, p, seed, NEED_DX=need_dx, DROPOUT=p > 0.0,
        BM=BM, BK=BK, BN=BN, BR=br, DT=dt, PREC=prec)
    blocks = triton_cdiv(n, BN) + triton_cdiv(k, BN)
    splits = n_splits(m, blocks, BM, x.device)
    rows = triton_cdiv(triton_cdiv(m, splits), BM) * BM
    splits = triton_cdiv(m, rows) if m else 1
    db_part = dispatch.empty((splits, n, r), torch.float32, x.device)
    dat_part = dispatch.empty((splits, k, r), torch.float32, x.device)
    if m == 0:
        db_part.zero_(), dat_part.zero_()
    else:
        tk.lora_bwd_dw_kernel[(blocks, splits)](
            g, h, x, dh, db_part, dat_part, m, k, n, r, rows, scale, p, seed,
            DROPOUT=p > 0.0, BM=BM, BC=BN, BR=br, DT=dt, PREC=prec)
    return dx, dat_part.sum(0).t().to(a.dtype), db_part.sum(0).to(b.dtype)


@lora_bwd.register_fake
def _(g, x, a, b, h, scale, p, seed, need_dx):
    return (x.new_empty(x.shape if need_dx else (0, x.shape[1])), torch.empty_like(a),
            torch.empty_like(b))


def dropout_mask(shape: tuple[int, int], p: float, seed: int, device: torch.device) -> Tensor:
    """The kernels' dropout keep-mask for an (M, K) input (bool), for tests and debugging."""
    from . import triton_lora as tk
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    tk.dropout_mask_kernel[(triton_cdiv(m, 32), triton_cdiv(k, 32))](out, m, k, p, seed, BM=32, BK=32)
    return out.bool()


class LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, base, scale: float, p: float, seed: int):
        y, h = torch.ops.dodo_kernels.lora_fwd(x, a, b, base, scale, p, seed)
        ctx.save_for_backward(x, a, b, h)
        ctx.args = (scale, p, seed, base is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, a, b, h = ctx.saved_tensors
        scale, p, seed, has_base = ctx.args
        dx, da, db = torch.ops.dodo_kernels.lora_bwd(g.contiguous(), x, a, b, h, scale, p, seed,
                                                     ctx.needs_input_grad[0])
        return (dx if ctx.needs_input_grad[0] else None, da, db, g if has_base else None,
                None, None, None)


def lora(x: Tensor, a: Tensor, b: Tensor, base: Tensor | None = None, scale: float = 1.0,
         dropout: float = 0.0, training: bool = False) -> Tensor:
    """base + scale * (drop(x) A^T) B^T over the last dimension of x (..., K) -> (..., N).

    A (R, K) and B (N, R) as in PEFT (lora_A.weight, lora_B.weight); dropout acts on x only
    when ``training``. Triton or reference per dispatch.py.
    """
    if not dispatch.use_triton(x, _shape_ok(a.shape[0]), "lora"):
        return lora_reference(x, a, b, base, scale, dropout, training)
    p = dropout if training else 0.0
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0.0 else 0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    base2 = None if base is None else base.reshape(-1, b.shape[0]).contiguous()
    y = LoRAFunction.apply(x2, a.contiguous(), b.contiguous(), base2, float(scale), float(p), seed)
    return y.reshape(*lead, b.shape[0])


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
