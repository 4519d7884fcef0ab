"""Fused bottleneck adapter: y = res + s * (W_up act(W_down x + b_down) + b_up).

Placements (dodo/adapters/bottleneck.py): sequential y = h + A(h) is ``residual=x``;
parallel y = f(x) + A(x) is ``residual=f(x)``; scaled parallel passes the learned scalar as
``scale``. Layers: triton_bottleneck.py kernels -> ``torch.ops.dodo_kernels.bottleneck_fwd``
/ ``bottleneck_bwd`` -> ``BottleneckFunction`` -> ``bottleneck_adapter()``.
The kernel keeps the hidden on chip, so it runs for hidden <= MAX_HIDDEN; wider adapters are
compute-bound GEMMs that cuBLAS already runs well, and take the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

ACTIVATIONS = ("relu", "gelu", "silu")
MAX_HIDDEN = 128
BM, BD = 32, 64


def _act(name: str):
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[name]


def bottleneck_reference(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                         residual: Tensor | None = None, scale: Tensor | None = None,
                         activation: str = "relu") -> Tensor:
    """x (..., D), w_down (H, D), b_down (H,), w_up (D, H), b_up (D,) -> (..., D)."""
    out = F.linear(_act(activation)(F.linear(x, w_down, b_down)), w_up, b_up)
    if scale is not None:
        out = scale * out
    return out if residual is None else residual + out


@torch.library.custom_op("dodo_kernels::bottleneck_fwd", mutates_args=())
def bottleneck_fwd(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                   residual: Tensor | None, scale: Tensor | None, res_is_x: bool,
                   activation: int) -> tuple[Tensor, Tensor]:
    """x (M, D) -> y (M, D), z (M, H) fp32 pre-activation. ``res_is_x``: y = x + ... ."""
    from . import triton_bottleneck as tk
    from .triton_common import dot_dtype, precision
    (m, d), h = x.shape, w_down.shape[0]
    y = dispatch.empty((m, d), x.dtype, x.device)
    z = dispatch.empty((m, h), torch.float32, x.device)
    res_mode = 1 if res_is_x else (2 if residual is not None else 0)
    tk.bottleneck_fwd_kernel[(cdiv(m, BM),)](
        x, w_down, b_down, w_up, b_up, residual if residual is not None else x,
        scale if scale is not None else x, y, z, m, d, h, RES=res_mode, HAS_S=scale is not None,
        ACT=activation, BM=BM, BD=BD, BH=dispatch.next_pow2(h), DT=dot_dtype(x.dtype),
        PREC=precision(x.dtype))
    return y, z


@bottleneck_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, residual, scale, res_is_x, activation):
    return torch.empty_like(x), x.new_empty((x.shape[0], w_down.shape[0]), dtype=torch.float32)


@torch.library.custom_op("dodo_kernels::bottleneck_bwd", mutates_args=())
def bottleneck_bwd(g: Tensor, x: Tensor, w_down: Tensor, w_up: Tensor, b_up: Tensor, z: Tensor,
                   scale: Tensor | None, res_is_x: bool, need_dx: bool, activation: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx, dW_down, db_down, dW_up, db_up, dscale (0-dim fp32; zero when scale is None)."""
    from . import triton_bottleneck as tk
    from .triton_common import dot_dtype, n_splits, precision
    (m, d), h = x.shape, w_down.shape[0]
    bh, dt, prec = dispatch.next_pow2(h), dot_dtype(x.dtype), precision(x.dtype)
    has_s = scale is not None
    n_rows = cdiv(m, BM)
    dz = dispatch.empty((m, h), torch.float32, x.device)
    dx = dispatch.empty((m, d) if need_dx else (0, d), x.dtype, x.device)
    ds_part = dispatch.empty((max(n_rows, 1),), torch.float32, x.device)
    if not has_s or m == 0:
        ds_part.zero_()
    if m:
        tk.bottleneck_bwd_dx_kernel[(n_rows,)](
            g, w_down, w_up, b_up, scale if has_s else x, z, dz, dx, ds_part, m, d, h,
            RES_IS_X=res_is_x, HAS_S=has_s, NEED_DX=need_dx, ACT=activation, BM=BM, BD=BD,
            BH=bh, DT=dt, PREC=prec)
    blocks = 2 * cdiv(d, BD)
    splits = n_splits(m, blocks, BM, x.device)
    rows = cdiv(cdiv(max(m, 1), splits), BM) * BM
    splits = cdiv(max(m, 1), rows)
    dwu = dispatch.empty((splits, d, h), torch.float32, x.device)
    dbu = dispatch.empty((splits, d), torch.float32, x.device)
    dwdt = dispatch.empty((splits, d, h), torch.float32, x.device)
    dbd = dispatch.empty((splits, h), torch.float32, x.device)
    if m == 0:
        for t in (dwu, dbu, dwdt, dbd):
            t.zero_()
    else:
        tk.bottleneck_bwd_dw_kernel[(blocks, splits)](
            g, x, z, dz, scale if has_s else x, dwu, dbu, dwdt, dbd, m, d, h, rows,
            HAS_S=has_s, ACT=activation, BM=BM, BD=BD, BH=bh, DT=dt, PREC=prec)
    wdt = w_down.dtype
    return (dx, dwdt.sum(0).t().to(wdt), dbd.sum(0).to(wdt), dwu.sum(0).to(w_up.dtype),
            dbu.sum(0).to(b_up.dtype), ds_part.sum())


@bottleneck_bwd.register_fake
def _(g, x, w_down, w_up, b_up, z, scale, res_is_x, need_dx, activation):
    dx = x.new_empty(x.shape if need_dx else (0, x.shape[1]))
    return (dx, torch.empty_like(w_down), w_down.new_empty((w_down.shape[0],)), torch.empty_like(w_up),
            torch.empty_like(b_up), x.new_empty((), dtype=torch.float32))


class BottleneckFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, residual, scale, res_is_x: bool, act: int):
        y, z = torch.ops.dodo_kernels.bottleneck_fwd(x, w_down, b_down, w_up, b_up, residual, scale,
                                                     res_is_x, act)
        ctx.save_for_backward(x, w_down, w_up, b_up, z, scale)
        ctx.args = (res_is_x, act, residual is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w_down, w_up, b_up, z, scale = ctx.saved_tensors
        res_is_x, act, has_res = ctx.args
        need_dx = ctx.needs_input_grad[0]
        dx, dwd, dbd, dwu, dbu, ds = torch.ops.dodo_kernels.bottleneck_bwd(
            g.contiguous(), x, w_down, w_up, b_up, z, scale, res_is_x, need_dx, act)
        ds = ds.to(scale.dtype).reshape(scale.shape) if scale is not None else None
        return (dx if need_dx else None, dwd, dbd, dwu, dbu, g if has_res else None, ds, None, None)


def bottleneck_adapter(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                       residual: Tensor | None = None, scale: Tensor | None = None,
                       activation: str = "relu") -> Tensor:
    """residual + scale * (W_up act(W_down x + b_down) + b_up) over the last dimension.

    ``residual`` may be ``x`` itself (sequential placement; the kernel then reads x twice and
    folds the residual gradient into dx) or another tensor of x's shape, or None.
    ``scale`` is None or a 0-dim tensor (the learned scalar of scaled-parallel adapters).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    ok = w_down.shape[0] <= MAX_HIDDEN and (scale is None or scale.numel() == 1)
    if not dispatch.use_triton(x, ok, "bottleneck_adapter"):
        return bottleneck_reference(x, w_down, b_down, w_up, b_up, residual, scale, activation)
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    res_is_x = residual is x
    res2 = None if residual is None or res_is_x else residual.reshape(-1, d).contiguous()
    s = None if scale is None else scale.reshape(())
    y = BottleneckFunction.apply(x2, w_down.contiguous(), b_down.contiguous(), w_up.contiguous(),
                                 b_up.contiguous(), res2, s, res_is_x, ACTIVATIONS.index(activation))
    return y.reshape(x.shape)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
