"""Grouped MoE adapter experts: y[t] = res[t] + sum_j w[t,j] * Adapter_{ids[t,j]}(x[t]).

Each expert is a bottleneck adapter, Adapter_e(x) = Wu[e] act(Wd[e] x + bd[e]) + bu[e], with
Wd (E, H, D), bd (E, H), Wu (E, D, H), bu (E, D). The routing comes from
``router.route_topk`` (or any router that produces the same ``order``/``offsets``):
``moe_adapter_experts(x, routing.weights, routing.order, routing.offsets, ...)``.
Gradients flow to x, the gate weights, all expert parameters and the residual.
Layers: triton_moe.py -> ``torch.ops.dodo_kernels.moe_experts_fwd`` / ``moe_experts_bwd`` ->
``MoEExpertsFunction`` -> ``moe_adapter_experts``; ``moe_experts_reference`` is the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .bottleneck import ACTIVATIONS, MAX_HIDDEN, _act

BM, BD = 32, 64


def moe_experts_reference(x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor,
                          w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                          residual: Tensor | None = None, activation: str = "relu") -> Tensor:
    """Expert by expert over the sorted assignments; x (T, D), weights (T, k)."""
    t, k = weights.shape
    y = torch.zeros_like(x) if residual is None else residual.clone()
    bounds = offsets.tolist()
    order = order.long()
    for e in range(w_down.shape[0]):
        rows = order[bounds[e]:bounds[e + 1]]
        if rows.numel() == 0:
            continue
        tok = rows // k
        hidden = _act(activation)(F.linear(x[tok], w_down[e], b_down[e]))
        out = F.linear(hidden, w_up[e], b_up[e]) * weights.reshape(-1)[rows, None].to(x.dtype)
        y = y.index_add(0, tok, out)
    return y


@torch.library.custom_op("dodo_kernels::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, w_down: Tensor,
                    b_down: Tensor, w_up: Tensor, b_up: Tensor, residual: Tensor | None,
                    activation: int) -> tuple[Tensor, Tensor]:
    """-> y (T, D), z (T*k, H) fp32 pre-activations in sorted-row order."""
    from . import triton_moe as tk
    from .triton_common import dot_dtype, precision
    (t, d), k = x.shape, weights.shape[1]
    e, h = w_down.shape[0], w_down.shape[1]
    z = dispatch.empty((t * k, h), torch.float32, x.device)
    y = dispatch.empty((t, d), x.dtype, x.device)
    direct = k == 1
    out = y if direct else dispatch.empty((t * k, d), x.dtype, x.device)
    grid = (cdiv(t * k, BM) + e,)
    common = dict(ACT=activation, BM=BM, BD=BD, BH=dispatch.next_pow2(h),
                  BE=dispatch.next_pow2(e, 2), DT=dot_dtype(x.dtype), PREC=precision(x.dtype))
    res = residual if residual is not None else x
    if t:
        tk.moe_fwd_kernel[grid](x, weights, order, offsets, w_down, b_down, w_up, b_up, res, out, z,
                                e, d, h, K=k, DIRECT=direct, HAS_RES=residual is not None, **common)
        if not direct:
            tk.combine_kernel[(cdiv(t, 32), cdiv(d, 64))](out, res, y, t, d, K=k,
                                                          HAS_RES=residual is not None, BT=32, BD=64)
    return y, z


@moe_experts_fwd.register_fake
def _(x, weights, order, offsets, w_down, b_down, w_up, b_up, residual, activation):
    return torch.empty_like(x), x.new_empty((order.shape[0], w_down.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dodo_kernels::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(g: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor,
                    w_down: Tensor, w_up: Tensor, b_up: Tensor, z: Tensor, activation: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx (T, D), dweights (T, k) fp32, dWd, dbd, dWu, dbu."""
    from . import triton_moe as tk
    from .triton_common import dot_dtype, precision
    (t, d), k = x.shape, weights.shape[1]
    e, h = w_down.shape[0], w_down.shape[1]
    common = dict(ACT=activation, BM=BM, BD=BD, BH=dispatch.next_pow2(h),
                  DT=dot_dtype(x.dtype), PREC=precision(x.dtype))
    dz = dispatch.empty((t * k, h), torch.float32, x.device)
    dgate = dispatch.empty((t, k), torch.float32, x.device)
    dx = dispatch.empty((t, d), x.dtype, x.device)
    direct = k == 1
    dx_rows = dx if direct else dispatch.empty((t * k, d), x.dtype, x.device)
    if t:
        tk.moe_bwd_rows_kernel[(cdiv(t * k, BM) + e,)](
            g, weights, order, offsets, w_down, w_up, b_up, z, dz, dgate, dx_rows, e, d, h,
            K=k, DIRECT=direct, BE=dispatch.next_pow2(e, 2), **common)
        if not direct:
            tk.combine_kernel[(cdiv(t, 32), cdiv(d, 64))](dx_rows, dx, dx, t, d, K=k, HAS_RES=False,
                                                          BT=32, BD=64)
    dwd = dispatch.empty(w_down.shape, w_down.dtype, x.device)
    dbd = dispatch.empty((e, h), w_down.dtype, x.device)
    dwu = dispatch.empty(w_up.shape, w_up.dtype, x.device)
    dbu = dispatch.empty(b_up.shape, b_up.dtype, x.device)
    tk.moe_bwd_weights_kernel[(e, cdiv(d, BD))](
        g, x, weights, order, offsets, z, dz, dwd, dbd, dwu, dbu, d, h, K=k, **common)
    return dx, dgate, dwd, dbd, dwu, dbu


@moe_experts_bwd.register_fake
def _(g, x, weights, order, offsets, w_down, w_up, b_up, z, activation):
    e, h = w_down.shape[0], w_down.shape[1]
    return (torch.empty_like(x), torch.empty(weights.shape, dtype=torch.float32, device=x.device),
            torch.empty_like(w_down), w_down.new_empty((e, h)), torch.empty_like(w_up),
            torch.empty_like(b_up))


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, order, offsets, w_down, b_down, w_up, b_up, residual, act: int):
        y, z = torch.ops.dodo_kernels.moe_experts_fwd(x, weights, order, offsets, w_down, b_down,
                                                      w_up, b_up, residual, act)
        ctx.save_for_backward(x, weights, order, offsets, w_down, w_up, b_up, z)
        ctx.args = (act, residual is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weights, order, offsets, w_down, w_up, b_up, z = ctx.saved_tensors
        act, has_res = ctx.args
        dx, dgate, dwd, dbd, dwu, dbu = torch.ops.dodo_kernels.moe_experts_bwd(
            g.contiguous(), x, weights, order, offsets, w_down, w_up, b_up, z, act)
        return (dx, dgate.to(weights.dtype), None, None, dwd, dbd, dwu, dbu,
                g if has_res else None, None)


def moe_adapter_experts(x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor,
                        w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                        residual: Tensor | None = None, activation: str = "relu") -> Tensor:
    """x (T, D); weights (T, k) gates; order (T*k,) / offsets (E+1,) int32 from the router;
    expert parameters stacked on dim 0. Returns (T, D). Rows with gate 0 contribute 0 (a
    capacity-dropping router can zero the gates of dropped assignments)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    ok = w_down.shape[1] <= MAX_HIDDEN and w_down.shape[0] <= 256
    if not dispatch.use_triton(x, ok, "moe_adapter_experts"):
        return moe_experts_reference(x, weights, order, offsets, w_down, b_down, w_up, b_up,
                                     residual, activation)
    res = None if residual is None else residual.contiguous()
    return MoEExpertsFunction.apply(
        x.contiguous(), weights.contiguous(), order.to(torch.int32).contiguous(),
        offsets.to(torch.int32).contiguous(), w_down.contiguous(), b_down.contiguous(),
        w_up.contiguous(), b_up.contiguous(), res, ACTIVATIONS.index(activation))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
